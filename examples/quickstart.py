"""Train a small MoE on a clustered regression task and print its routing statistics.

Each input comes from one of 4 clusters, and each cluster has its own linear target map. A 4-expert
top-1 MoE learns to route by cluster: each cluster ends up (almost) entirely on one expert. Whether the
four clusters also get four *different* experts is not guaranteed: a top-1 router can lock in early,
give two clusters to the same expert and leave another expert idle, and the small Switch balancing loss
does not undo that within 300 steps. The script prints the expert-by-cluster table and counts both
(clusters kept on one expert, experts shared by clusters, idle experts), so the summary states what
this run did.
Legend: T tokens, D dim, E experts.
"""
import torch

import moekit

torch.manual_seed(0)
D, E, T = 16, 4, 2048
centres_ED = 3 * torch.randn(E, D)
maps_EDD = torch.randn(E, D, D) / D ** 0.5


def batch(n):
    cluster_T = torch.randint(0, E, (n,))
    x_TD = centres_ED[cluster_T] + torch.randn(n, D)
    y_TD = torch.einsum("td,tde->te", x_TD, maps_EDD[cluster_T])
    return x_TD, y_TD, cluster_T


layer = moekit.MoE(dim=D, hidden_dim=32, num_experts=E, top_k=1, router="switch", expert="mlp")
opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
for step in range(301):
    x, y, _ = batch(T)
    out = layer(x)
    task_loss = torch.nn.functional.mse_loss(out.y, y)
    loss = task_loss + out.aux_loss            # the one place the aux loss is added
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        m = out.metrics
        print(f"step {step:3d}  mse {task_loss.item():7.3f}  aux {out.aux_loss.item():.4f}  "
              f"cv_load {m['cv_load'].item():.3f}  router_entropy {m['router_entropy'].item():.3f}")

layer.eval()
x, y, cluster = batch(4000)
with torch.no_grad():
    decision = layer.router(x)
    out = layer(x)
table = torch.zeros(E, E, dtype=torch.long)
table.index_put_((decision.expert_ids[:, 0], cluster), torch.ones_like(cluster), accumulate=True)
print("\ntokens per expert:", out.metrics["tokens_per_expert"].long().tolist())
print("max/mean load:    ", round(out.metrics["max_over_mean_load"].item(), 3))
print("expert x cluster routing table (rows: experts):")
for e in range(E):
    print("  expert", e, table[e].tolist())
print("eval mse:", round(torch.nn.functional.mse_loss(out.y, y).item(), 4))

owner = table.argmax(0)                                     # the expert that gets most of each cluster
pure = int((table.max(0).values >= 0.95 * table.sum(0)).sum())
shared = int((torch.bincount(owner, minlength=E) > 1).sum())
idle = int((table.sum(1) == 0).sum())
print(f"clusters with >= 95 % of their tokens on one expert: {pure} of {E}")
print(f"experts that own more than one cluster: {shared}; idle experts: {idle}")
