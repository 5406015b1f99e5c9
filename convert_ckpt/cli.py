"""Command line of convert_ckpt: `python -m convert_ckpt {checkpoint,export,verify,inspect[,dataset]} ...`.

    python -m convert_ckpt inspect FILE.pt
    python -m convert_ckpt checkpoint --src FILE.pt --dst DIR [--format auto|tdmpc2|native] [--config CFG.json]
                                      [--num-tasks N --task-dim E --obs-dim O --action-dim A --simnorm-dim S ...]
    python -m convert_ckpt export --src DIR --dst FILE.pt [--format native|tdmpc2]
    python -m convert_ckpt verify --ckpt FILE.pt|DIR --golden FILE.npz [--config CFG.json] [--atol 1e-5]
    python -m convert_ckpt verify-update --dir DIR [--dtype float64|float32] [--case NAME ...]

Exit status: 0 success; 1 verify / verify-update found an error above its tolerance; 2 the input was refused (unsafe, corrupt, wrong
layout, config mismatch); 3 verify could check nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from convert_ckpt import dataset
from convert_ckpt import verify as V
from convert_ckpt.api import convert_checkpoint, export_checkpoint, given_from_config, load_checkpoint, merge_given
from convert_ckpt.errors import ConvertError, SafeLoadError, StateDictError
from convert_ckpt.formats import detect_format, parse_checkpoint
from convert_ckpt.safe_load import Stub, safe_torch_load
from convert_ckpt.store import is_converted_dir, read_manifest

EXIT_OK, EXIT_MISMATCH, EXIT_REFUSED, EXIT_NOTHING = 0, 1, 2, 3


def _add_given_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="JSON config in the layout of tests/fixtures/config_small.json: "
                   "checked against the checkpoint and used for facts shapes cannot tell")
    g = p.add_argument_group("facts (checked against the checkpoint when it holds them, used when it does not)")
    g.add_argument("--num-tasks", type=int)
    g.add_argument("--task-dim", type=int)
    g.add_argument("--obs-dim", type=int)
    g.add_argument("--action-dim", type=int)
    g.add_argument("--latent-dim", type=int)
    g.add_argument("--simnorm-dim", type=int, help="SimNorm group size (not in the shapes; default 8)")
    g.add_argument("--num-bins", type=int)
    g.add_argument("--vmin", type=float, help="reward bins range (not in the shapes; default -10)")
    g.add_argument("--vmax", type=float, help="reward bins range (not in the shapes; default 10)")
    g.add_argument("--flow-integrator", choices=("euler", "heun"), help="flow WM integrator (default heun)")
    g.add_argument("--flow-substeps", type=int, help="flow WM substeps (default 4)")
    g.add_argument("--actor-min-logstd", type=float, help="Gaussian actor log-std lower bound (default -1.427)")
    g.add_argument("--tasks", help="comma-separated task names, in embedding-row order")


def _given(args) -> dict:
    wm = {k: getattr(args, k, None) for k in ("num_tasks", "task_dim", "obs_dim", "action_dim", "latent_dim",
                                              "simnorm_dim", "num_bins", "vmin", "vmax")}
    flags: dict[str, Any] = {
        "world_model": wm,
        "world_model:flow": {"integrator": getattr(args, "flow_integrator", None), "substeps": getattr(args, "flow_substeps", None)},
        "actor:gaussian": {"min_logstd": getattr(args, "actor_min_logstd", None)},
    }
    if getattr(args, "tasks", None):
        flags["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    cfg = given_from_config(args.config) if getattr(args, "config", None) else None
    return merge_given(cfg, flags)  # flags win over the config file


# ----------------------------------------------------------------------------------------------- commands


def cmd_checkpoint(args) -> int:
    m = convert_checkpoint(args.src, args.dst, fmt=args.format, given=_given(args), overwrite=args.overwrite)
    print(f"converted {args.src} -> {args.dst}")
    print(f"  format: {m['source']['format']} ({m['source']['layout']}), sha256 {m['source']['sha256']}")
    for name, mod in m["modules"].items():
        desc = {k: v for k, v in (mod.get("config") or {}).items()}
        print(f"  {name}: {mod.get('kind', '')} {mod['num_params']:,} params {json.dumps(desc) if desc else ''}")
        if mod.get("preset"):
            pr = mod["preset"]
            print(f"    preset: {pr['name']}{' (MT30 layout)' if pr.get('mt30') else ''} - {pr['why']}")
    if m["tasks"]:
        print(f"  tasks ({len(m['tasks'])}): {', '.join(m['tasks'][:8])}{' ...' if len(m['tasks']) > 8 else ''}")
    for n in m["notes"]:
        print(f"  note: {n}")
    return EXIT_OK


def cmd_export(args) -> int:
    path, notes = export_checkpoint(args.src, args.dst, fmt=args.format)
    print(f"exported {args.src} -> {path} ({args.format} layout)")
    for n in notes:
        print(f"  note: {n}")
    return EXIT_OK


def cmd_verify(args) -> int:
    given = _given(args)
    conv = load_checkpoint(args.ckpt, given)
    try:
        with np.load(args.golden) as f:
            golden = {k: f[k] for k in f.files}
    except Exception as exc:
        raise SystemExit(f"error: cannot read golden file {args.golden}: {exc}")
    cfg = json.loads(Path(args.config).read_text()) if args.config else {}
    if getattr(args, "flow_integrator", None):
        cfg["flow_integrator"] = args.flow_integrator
    if getattr(args, "flow_substeps", None):
        cfg["flow_substeps"] = args.flow_substeps
    if getattr(args, "actor_min_logstd", None) is not None:
        cfg["actor_min_logstd"] = args.actor_min_logstd
    print(f"verify {args.ckpt} ({conv.format}/{conv.layout}; modules: {', '.join(conv.modules())}) against {args.golden}")
    results = V.verify(conv, golden, cfg, args.atol)
    print(V.format_results(results, args.atol))
    code = V.exit_code(results)
    if code == EXIT_NOTHING:
        print("error: nothing could be checked: the golden file has no output this checkpoint's modules produce", file=sys.stderr)
    return code


def cmd_verify_update(args) -> int:
    from convert_ckpt import verify_update as VU

    print(f"verify-update {args.dir} ({args.dtype}): the reference's recorded PWM.update() calls replayed by fmbpo_jax")
    try:
        results = VU.verify_update(args.dir, args.dtype, cases=args.case or None)
    except VU.GoldenSetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if not results:
        print(f"error: no case of {args.dir} matched {args.case}", file=sys.stderr)
        return EXIT_NOTHING
    print(VU.format_results(results))
    return EXIT_OK if all(r.status == "ok" for r in results) else EXIT_MISMATCH


def _describe(v) -> str:
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
    if isinstance(v, Stub):
        return f"<{v.stub_class} (data stub; not imported)>"
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _tree_lines(obj, indent: str = "  ", depth: int = 0, max_items: int = 400) -> list[str]:
    lines = []
    for i, (k, v) in enumerate(obj.items()):
        if i >= max_items:
            lines.append(f"{indent * (depth + 1)}... ({len(obj) - max_items} more)")
            break
        if isinstance(v, Mapping) and v and depth < 3:
            lines.append(f"{indent * (depth + 1)}{k}: ({len(v)} entries)")
            lines.extend(_tree_lines(v, indent, depth + 1, max_items))
        else:
            lines.append(f"{indent * (depth + 1)}{k}: {_describe(v)}")
    return lines


def cmd_inspect(args) -> int:
    if is_converted_dir(args.file):
        m = read_manifest(args.file)
        print(f"{args.file}: converted checkpoint directory")
        print(json.dumps({k: m[k] for k in ("source", "modules", "sizes", "tasks", "running_stats", "notes")}, indent=1))
        return EXIT_OK
    obj = safe_torch_load(args.file)
    print(f"{args.file}:")
    if isinstance(obj, Mapping):
        print("\n".join(_tree_lines(obj)))
    else:
        print(f"  top level: {_describe(obj)}")
    fmt = detect_format(obj)
    try:
        conv = parse_checkpoint(obj, _given(args))
    except Exception as exc:
        print(f"detected format: {fmt}; the layout does not convert: {type(exc).__name__}: {exc}")
        return EXIT_REFUSED
    print(f"detected format: {conv.format} (layout {conv.layout}); modules: {', '.join(conv.modules())}")
    if conv.wm_cfg is not None:
        pr = conv.preset()
        print(f"  world_model: {conv.wm_cfg}")
        print(f"    preset: {pr['name']}{' (MT30 layout)' if pr.get('mt30') else ''} - {pr['why']}")
    if conv.actor_cfg is not None:
        print(f"  actor: {conv.actor_cfg}")
    if conv.critic_cfg is not None:
        print(f"  critic: {conv.critic_cfg}")
    if conv.extras_info:
        print(f"  tdmpc2_extras: {json.dumps(conv.extras_info)}")
    if conv.running_stats:
        print(f"  running statistics: {sorted(conv.running_stats)}")
    for n in conv.notes:
        print(f"  note: {n}")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert_ckpt", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("checkpoint", help="PyTorch .pt (TD-MPC2 or native) -> Flax params directory (orbax + manifest.json)")
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--format", default="auto", choices=("auto", "tdmpc2", "native"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (atomically)")
    _add_given_flags(p)
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("export", help="converted directory -> PyTorch .pt (native format, loadable by the reference's load_wm)")
    p.add_argument("--src", required=True, type=Path)
    p.add_argument("--dst", required=True, type=Path)
    p.add_argument("--format", default="native", choices=("native", "tdmpc2"))
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="recompute golden outputs from a checkpoint and report max abs errors")
    p.add_argument("--ckpt", required=True, type=Path, help=".pt file or converted directory")
    p.add_argument("--golden", required=True, type=Path)
    p.add_argument("--atol", type=float, default=1e-5)
    _add_given_flags(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("verify-update", help="replay a whole-update golden set (the reference's PWM.update() with its random "
                       "draws) and compare every metric, buffer, gradient and parameter change")
    p.add_argument("--dir", required=True, type=Path, help="golden directory: config_small.json, the three weight files "
                   "and golden_update_small.{npz,json} (tests/fixtures is one)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                   help="float64: every array within 1e-8 abs + 1e-8 rel; float32 (highest matmul precision): within "
                   "max(10 x the reference's own float32 deviation, 1e-6)")
    p.add_argument("--case", action="append", help="only this case (repeatable); default: every case of the set")
    p.set_defaults(func=cmd_verify_update)

    p = sub.add_parser("inspect", help="print the key tree, shapes and detected format without converting")
    p.add_argument("file", type=Path)
    _add_given_flags(p)
    p.set_defaults(func=cmd_inspect)

    dataset.add_dataset_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConvertError, SafeLoadError, StateDictError) as exc:
        kind = "refused (unsafe pickle; nothing was executed)" if type(exc).__name__ == "UnsafePickleError" else type(exc).__name__
        print(f"error: {kind}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
