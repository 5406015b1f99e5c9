import sys, re, time
import jax, jax.numpy as jnp
from fmbpo_jax import pwm, presets
from fmbpo_jax.world_model import WMConfig
from fmbpo_jax.actors import ActorConfig
from fmbpo_jax.critic import CriticConfig
import dataclasses
ft = sys.argv[1] == "finetune"
H,B,O,A,L=16,256,24,6,128
beh=presets.preset_values(sys.argv[2] if len(sys.argv)>2 else "reference")
fields={k:v for k,v in beh.items() if k in {f.name for f in dataclasses.fields(pwm.PWMConfig)}}
cfg=pwm.PWMConfig(wm=WMConfig(obs_dim=O,action_dim=A,latent_dim=L,task_dim=16,num_tasks=3,encoder_units=(256,),units=(256,256)),
    actor=ActorConfig(latent_dim=L,action_dim=A,units=(128,128)),critic=CriticConfig(latent_dim=L,units=(128,128)),horizon=H,finetune_wm=ft,**fields)
k=jax.random.split(jax.random.PRNGKey(0),4)
st=pwm.init_state(cfg,k[0])
from fmbpo_jax import world_model as wm
w=wm.init(cfg.wm,k[1])
batch={"obs":jax.random.normal(k[2],(H+1,B,O)),"action":jax.random.uniform(k[3],(H,B,A)),"reward":jnp.zeros((H,B)),"task":jnp.asarray(1,jnp.int32)}
f=jax.jit(lambda s,b,kk,w: pwm.update(cfg,s,b,kk,None if ft else w))
c=f.lower(st,batch,k[0],w).compile()
ca=c.cost_analysis(); ca=ca[0] if isinstance(ca,list) else ca
txt=c.as_text()
print("flops %.4g bytes %.4g ops %d fusions %d dots %d" % (ca.get("flops",0), ca.get("bytes accessed",0), txt.count(" = "), txt.count("fusion("), len(re.findall(r"\bdot\(", txt))))
out=f(st,batch,k[0],w); jax.block_until_ready(out)
ts=[]
for i in range(7):
    t=time.perf_counter(); out=f(st,batch,k[0],w); jax.block_until_ready(out); ts.append(time.perf_counter()-t)
print("min %.4f median %.4f" % (min(ts), sorted(ts)[3]))
