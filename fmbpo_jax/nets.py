"""Layers: Mish, SimNorm, NormedLinear, the world-model MLP, the actor/critic MLP, ensembles, task embedding.

Flax linen is only a thin init/apply layer here: parameters are plain nested dicts whose paths mirror the
PyTorch state_dict keys of the reference (`_encoder.0.weight` <-> `_encoder/0/kernel`, transposed;
`.ln.weight` <-> `ln/scale`), so `convert_ckpt.torch_mapping` converts by rule.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

LN_EPS = 1e-5
COMPUTE_DTYPES = ("float32", "bfloat16")
# checkpoint_name of every matmul's activation operand (bf16 after the cast under compute_dtype='bfloat16'): the
# names the 'matmul_inputs' remat policy saves. Outside a jax.checkpoint the name is an identity that lowers to
# nothing (tests/test_remat_policy.py compares the compiled HLO).
MATMUL_INPUT = "matmul_input"
# what a rematerialised rollout scan keeps for its backward pass (PWMConfig.remat, --config.remat_policy)
REMAT_POLICIES = ("all", "step", "matmul_inputs")


def check_compute_dtype(compute_dtype: str, owner: str) -> None:
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{owner}.compute_dtype={compute_dtype!r}; allowed: {COMPUTE_DTYPES}")


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] -> float32 [..., N] with bfloat16 operands and float32 accumulation.

    The backward pass is bf16 x bf16 -> f32 too (a plain autodiff transpose would mix an f32 cotangent with
    bf16 operands and fall back to an f32 matmul): on CPUs with AVX512-BF16 and on GPU/TPU tensor cores this
    runs at about twice (CPU) to many times (GPU) the float32 rate. Params, activations, LayerNorm, Mish and
    the optimizer stay float32 (mixed precision).
    """
    return _bf16_matmul_fwd(x, w)[0]


def _bf16_matmul_fwd(x, w):
    # named here, inside the rule, so that a 'matmul_inputs' checkpoint keeps the bf16 residual (half the f32
    # bytes); tagging x before the cast would round the input's cotangent to bf16
    xb, wb = checkpoint_name(x.astype(jnp.bfloat16), MATMUL_INPUT), w.astype(jnp.bfloat16)
    return jnp.matmul(xb, wb, preferred_element_type=jnp.float32), (xb, wb)


def _input_grad_bf16(gb: jax.Array, wb: jax.Array) -> jax.Array:
    """gb [..., N] @ wb [K, N]^T -> float32 [..., K], bf16 operands.

    XLA:CPU (jax 0.10) runs a bf16 dot whose weight operand is contracted on its last axis (the transpose
    in g @ W^T) as an f32 dot: half the bf16 rate. Written as a batched dot over the two halves of K (a free
    reshape of W; g broadcast to both) it stays bf16 x bf16 -> f32, about 1.9x faster, with the same sums.
    GPUs/TPUs transpose for free, so there it stays one plain dot.
    """
    k, n = wb.shape
    if jax.default_backend() != "cpu" or k % 2:
        return jnp.matmul(gb, wb.T, preferred_element_type=jnp.float32)
    g2 = gb.reshape(-1, n)
    halves = jnp.einsum("bmn,bkn->bmk", jnp.broadcast_to(g2, (2,) + g2.shape), wb.reshape(2, k // 2, n),
                        preferred_element_type=jnp.float32)  # [2, M, K/2]
    return jnp.moveaxis(halves, 0, 1).reshape(gb.shape[:-1] + (k,))


def _bf16_matmul_bwd(res, g):
    xb, wb = res
    gb = g.astype(jnp.bfloat16)
    dx = _input_grad_bf16(gb, wb)
    k, n = wb.shape
    dw = jnp.matmul(xb.reshape(-1, k).T, gb.reshape(-1, n), preferred_element_type=jnp.float32)
    return dx, dw


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, compute_dtype: str = "float32") -> jax.Array:
    """x [..., K] @ w [K, N] in float32, or with bf16 operands (`bf16_matmul`) when compute_dtype='bfloat16'."""
    if compute_dtype == "bfloat16":
        return bf16_matmul(x, w)  # names its bf16 operand itself
    return checkpoint_name(x, MATMUL_INPUT) @ w


def _dense_dot_general(compute_dtype: str) -> Callable:
    """A `dot_general` for nn.Dense that routes its (last axis x kernel) contraction through `matmul`."""
    if compute_dtype == "float32":
        def dot_general_f32(x, kernel, *args, **kwargs):
            return jax.lax.dot_general(checkpoint_name(x, MATMUL_INPUT), kernel, *args, **kwargs)

        return dot_general_f32

    def dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
        del dimension_numbers, precision, preferred_element_type  # nn.Dense: last axis of x with axis 0 of kernel
        return matmul(x, kernel, compute_dtype)

    return dot_general


def remat_scan_body(body: Callable, policy: str) -> Callable:
    """A rollout scan's step as the backward pass should see it, by what it keeps (one of REMAT_POLICIES).

    'all': the step as is (every intermediate saved, stacked over the H steps); 'step': only the step's carry
    and inputs, the whole step recomputed in the backward pass; 'matmul_inputs': the operands of its matmuls
    (MATMUL_INPUT, bf16 under bf16 compute) saved, the elementwise work between them (LayerNorm, Mish,
    SimNorm, softmax, tanh) recomputed. All three give the same numbers: recomputation, not approximation.
    """
    if policy == "all":
        return body
    if policy == "step":
        return jax.checkpoint(body)
    if policy == "matmul_inputs":
        return jax.checkpoint(body, policy=jax.checkpoint_policies.save_only_these_names(MATMUL_INPUT))
    raise ValueError(f"remat policy {policy!r}; allowed: {REMAT_POLICIES}")


def remat_policy(remat: bool | str) -> str:
    """The policy name of a remat setting: False -> 'all', True -> 'step' (the old boolean), names unchanged."""
    if isinstance(remat, bool):
        return "step" if remat else "all"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; allowed: True, False or one of {REMAT_POLICIES}")
    return remat


# Mish above this input is x to float32 precision (torch's softplus also returns x above 20).
_MISH_CLAMP = 20.0


def _mish_terms(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """e = exp(x), n = e (e + 2) and r = 1 / (n + 2), with x clamped so that n stays finite."""
    e = jnp.exp(jnp.minimum(x, _MISH_CLAMP))
    n = e * (e + 2.0)
    return e, n, 1.0 / (n + 2.0)


def _mish_value(x: jax.Array, n: jax.Array, r: jax.Array) -> jax.Array:
    """x n / (n + 2), written x - 2 x r for x > 0: there n / (n + 2) is close to 1 and x n r rounds twice on a value
    near x (about 0.5 ulp on average against 0.3 ulp for the difference, measured on float32 CPU); for x <= 0 the
    product keeps the small result's relative precision."""
    return jnp.where(x > 0, x - 2.0 * x * r, x * n * r)


@jax.custom_jvp
def mish(x: jax.Array) -> jax.Array:
    """x * tanh(softplus(x)), in the closed form x * n / (n + 2) with n = e^x (e^x + 2).

    Same function (tanh(log(1 + e^x)) = n / (n + 2)); one exp and one reciprocal instead of exp, log1p
    and tanh, about 5x faster on XLA:CPU, where the log1p dominated. Max abs difference ~2e-7 |x|.
    """
    _, n, r = _mish_terms(x)
    return _mish_value(x, n, r)


@mish.defjvp
def _mish_jvp(primals, tangents):
    # d/dx [x n / (n + 2)] = n / (n + 2) + x * 2 n' / (n + 2)^2 with n' = 2 e (e + 1); written out so the
    # backward reuses e, n, r instead of differentiating through the clamp and the division.
    (x,), (dx,) = primals, tangents
    e, n, r = _mish_terms(x)
    return _mish_value(x, n, r), (n * r + x * 4.0 * e * (e + 1.0) * r * r) * dx


def simnorm(x: jax.Array, group: int = 8) -> jax.Array:
    """Softmax inside contiguous groups of `group` features of the last axis: [..., D] -> [..., D]."""
    if x.shape[-1] % group:
        raise ValueError(f"SimNorm: last dim {x.shape[-1]} is not a multiple of simnorm_dim={group}")
    y = jax.nn.softmax(x.reshape(*x.shape[:-1], x.shape[-1] // group, group), axis=-1)
    return y.reshape(x.shape)


def torch_linear_kernel_init() -> Callable:
    """PyTorch's default nn.Linear weight init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)); kernel is [in, out]."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Callable:
    """PyTorch's default nn.Linear bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# TD-MPC2 initialises every Linear with trunc_normal_(std=0.02), whose truncation is at +-2 in absolute
# units (100 std), i.e. effectively a plain normal.
wm_kernel_init = nn.initializers.normal(stddev=0.02)


def layer_norm(name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] like PyTorch, not E[x^2]-mean^2 (parity at 1e-6).
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


class NormedLinear(nn.Module):
    """Linear -> LayerNorm -> activation ('mish' | 'simnorm' | 'none').

    Params: kernel [in, out], bias [out], ln/{scale, bias} (PyTorch: weight.T, bias, ln.weight, ln.bias).
    """

    features: int
    act: str = "mish"
    simnorm_dim: int = 8
    compute_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", wm_kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = layer_norm("ln")(matmul(x, kernel, self.compute_dtype) + bias)
        if self.act == "mish":
            return mish(y)
        if self.act == "simnorm":
            return simnorm(y, self.simnorm_dim)
        if self.act == "none":
            return y
        raise ValueError(f"NormedLinear: unknown act {self.act!r}")


class WMMLP(nn.Module):
    """TD-MPC2 `mlp(in, hidden, out, last)`: NormedLinear+Mish per hidden width, then the last layer.

    last='simnorm': NormedLinear with SimNorm (encoder, dynamics, reference velocity head).
    last='linear': plain Linear (reward head, fixed velocity head). Layers are named '0', '1', ...
    zero_last: zero the last kernel (the reference zero-inits the reward head).
    compute_dtype: 'float32' | 'bfloat16' matmul operands (see `matmul`); params stay float32.
    """

    hidden: Sequence[int]
    out: int
    last: str = "simnorm"
    simnorm_dim: int = 8
    zero_last: bool = False
    compute_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden):
            x = NormedLinear(width, "mish", compute_dtype=self.compute_dtype, name=str(i))(x)
        name = str(len(self.hidden))
        if self.last == "simnorm":
            return NormedLinear(self.out, "simnorm", self.simnorm_dim, self.compute_dtype, name=name)(x)
        if self.last == "linear":
            init = nn.initializers.zeros if self.zero_last else wm_kernel_init
            return nn.Dense(self.out, kernel_init=init, bias_init=nn.initializers.zeros,
                            dot_general=_dense_dot_general(self.compute_dtype), name=name)(x)
        raise ValueError(f"WMMLP: unknown last layer {self.last!r}")


class ActMLP(nn.Module):
    """Actor/critic MLP of the reference: per hidden width Linear -> Mish -> LayerNorm, then Linear(out).

    Names follow the PyTorch Sequential indices: Linear '0','3','6',..., LayerNorm '2','5',...
    init_scheme: "torch" (PyTorch default Linear init, actors) or 'orthogonal' (gain sqrt(2), bias 0; critic).
    """

    hidden: Sequence[int]
    out: int
    init_scheme: str = "torch"
    compute_dtype: str = "float32"

    def _dense(self, width: int, fan_in: int, name: str) -> nn.Dense:
        dot = _dense_dot_general(self.compute_dtype)
        if self.init_scheme == "torch":
            return nn.Dense(width, kernel_init=torch_linear_kernel_init(), bias_init=torch_linear_bias_init(fan_in),
                            dot_general=dot, name=name)
        if self.init_scheme == "orthogonal":
            return nn.Dense(width, kernel_init=nn.initializers.orthogonal(math.sqrt(2.0)), bias_init=nn.initializers.zeros,
                            dot_general=dot, name=name)
        raise ValueError(f"ActMLP: unknown init_scheme {self.init_scheme!r}")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden):
            x = self._dense(width, x.shape[-1], str(3 * i))(x)
            x = layer_norm(str(3 * i + 2))(mish(x))
        return self._dense(self.out, x.shape[-1], str(3 * len(self.hidden)))(x)


def ensemble(module_cls: type[nn.Module], size: int, in_axes=None) -> type[nn.Module]:
    """K copies of a module with parameters stacked on a leading axis; output [K, ...].

    in_axes=None: one input shared by every member; 0: a leading member axis on the input.
    """
    return nn.vmap(
        module_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        out_axes=0,
        axis_size=size,
    )


def embedding_scale(weight_rows: jax.Array, max_norm: float = 1.0) -> jax.Array:
    """Factor that nn.Embedding(max_norm=1) applies to looked-up rows [..., D] -> [..., 1].

    PyTorch renormalises rows with norm > max_norm to max_norm / (norm + 1e-7), in place; we do it at
    lookup time as a pure function, so stored params are never mutated.
    """
    norm = jnp.linalg.norm(weight_rows, axis=-1, keepdims=True)
    return jnp.where(norm > max_norm, max_norm / (norm + 1e-7), 1.0)


@jax.custom_vjp
def _renormed_rows(rows: jax.Array) -> jax.Array:
    return rows * embedding_scale(rows)


def _renormed_rows_fwd(rows):
    return _renormed_rows(rows), None


def _renormed_rows_bwd(_, g):
    # PyTorch renormalises the stored row in place under no_grad and then looks it up, so the gradient it
    # gives the stored row is the plain output gradient (no scale factor, no renorm Jacobian).
    return (g,)


_renormed_rows.defvjp(_renormed_rows_fwd, _renormed_rows_bwd)


def task_embedding(table: jax.Array, task: jax.Array, max_norm: float = 1.0) -> jax.Array:
    """Look up task rows of table [num_tasks, task_dim] for task ids [...] -> [..., task_dim], max-norm applied.

    Values: rows with norm > 1 scaled to 1 / (norm + 1e-7), as nn.Embedding(max_norm=1) stores them. Gradient:
    the output gradient itself, which is what PyTorch gives its (already renormalised) stored row.
    """
    if max_norm != 1.0:
        raise ValueError(f"task_embedding supports max_norm=1 (the reference's), got {max_norm}")
    return _renormed_rows(jnp.take(table, task, axis=0))


def renormed_table(table: jax.Array, used_task_ids, max_norm: float = 1.0) -> jax.Array:
    """What PyTorch's in-place max-norm leaves in the table after looking up `used_task_ids` (for parity checks)."""
    used = jnp.zeros((table.shape[0],), bool).at[jnp.asarray(used_task_ids)].set(True)
    return jnp.where(used[:, None], table * embedding_scale(table, max_norm), table)


def action_mask_table(action_dims: Sequence[int], max_action_dim: int) -> jax.Array:
    """[num_tasks, max_action_dim] float32 mask: 1 for the first action_dims[t] columns of task t."""
    cols = jnp.arange(max_action_dim)[None, :]
    return (cols < jnp.asarray(action_dims)[:, None]).astype(jnp.float32)
