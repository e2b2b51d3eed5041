"""Plain references for the Chen et al. 2022 tests (models and experiment): the official Conv1d expert,
one run of the official MoE written the slow obvious way, and a tiny data set.

Legend: R runs, N examples, P patches, D patch dim, K clusters, M experts, F filters (2J), C classes.
"""
import torch
import torch.nn.functional as F
from torch import nn

from moekit.repro.datasets.chen_clusters import make_chen_data
from moekit.repro.models.chen2022 import ChenMoE


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------- references
def conv_expert(x_NPD, conv, activation, J):
    """The official network: Conv1d(1, 2J, D, stride D) on the flat input, σ, sum over patches, class sums."""
    h = conv(x_NPD.reshape(x_NPD.shape[0], 1, -1))          # (N, 2J, P)
    if activation == "cubic":
        h = h ** 3
    h = h.sum(2)
    return torch.stack([h[:, :J].sum(1), h[:, J:].sum(1)], dim=1)


def make_conv(w_FD, b_F):
    F_, D = w_FD.shape
    conv = nn.Conv1d(1, F_, D, stride=D).to(w_FD.dtype)
    with torch.no_grad():
        conv.weight.copy_(w_FD[:, None, :])
        conv.bias.copy_(b_F)
    return conv


class RefMoE(nn.Module):
    """One run of the official MoE, written the slow obvious way (every expert on every example + one-hot)."""

    def __init__(self, batched: ChenMoE, r: int):
        super().__init__()
        self.J, self.act, self.gate = batched.filters_per_class, batched.activation, batched.gate
        M, D = batched.num_experts, batched.dim
        self.experts = nn.ModuleList(make_conv(batched.expert_w_RMFD[r, m].detach(),
                                               batched.expert_b_RMF[r, m].detach()) for m in range(M))
        self.router = nn.Conv1d(1, M, D, stride=D, bias=False).to(batched.router_w_RMD.dtype)
        with torch.no_grad():
            self.router.weight.copy_(batched.router_w_RMD[r].detach()[:, None, :])

    def forward(self, x_NPD, noise_NM):
        noisy_NM = self.router(x_NPD.reshape(x_NPD.shape[0], 1, -1)).sum(2) + noise_NM
        top_N, ids_N = noisy_NM.max(1)
        if self.gate == "softmax":
            top_N = torch.softmax(noisy_NM, 1)[torch.arange(len(ids_N)), ids_N]
        all_NMC = torch.stack([conv_expert(x_NPD, e, self.act, self.J) for e in self.experts], 1)
        onehot_NM = F.one_hot(ids_N, len(self.experts)).to(x_NPD.dtype)
        return top_N[:, None] * torch.einsum("nm,nmc->nc", onehot_NM, all_NMC), ids_N


def tiny(n=24, D=6, P=4, K=2, seed=0, dtype=torch.float64):
    d = make_chen_data(n, num_clusters=K, num_patches=P, dim=D, generator=gen(seed))
    d.x_NPD = d.x_NPD.to(dtype)
    return d
