"""Patch a transformers MoE model with moekit layers and inspect its routing with RoutingMonitor.

Builds a tiny random Qwen2-MoE (no download), checks that the patched model gives the original's
logits, runs a few batches under a RoutingMonitor, prints the per-layer routing table and writes a
markdown report with per-layer load heat-maps (matplotlib) into the folder given as the first argument
(default: ./routing_report). A random model routes arbitrarily: the numbers show what the monitor
measures, not how a trained Qwen-MoE routes.

Needs the ``hf`` extra: ``pip install "torch==2.13.0" -e ".[hf,experiments]"``.
Legend: B batch, S sequence length, V vocabulary.
"""
import copy
import sys

import torch

import moekit.hf
from moekit.analysis import RoutingMonitor

try:
    import transformers
except ImportError:
    sys.exit("this example needs transformers: pip install 'moekit[hf]'")

torch.manual_seed(0)
B, S, V = 4, 32, 256
config = transformers.Qwen2MoeConfig(
    vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=True)
original = transformers.Qwen2MoeForCausalLM(config).eval()
with torch.no_grad():     # transformers initialises the router with std 0.02 (near-uniform): make routing token-dependent
    for name, p in original.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.normal_(0, 0.5)
model = moekit.hf.patch(copy.deepcopy(original))

ids = torch.randint(0, V, (B, S))
with torch.no_grad():
    diff = (model(input_ids=ids).logits - original(input_ids=ids).logits).abs().max().item()
print(f"patched vs original logits: max |difference| = {diff:.2e}")

out_dir = sys.argv[1] if len(sys.argv) > 1 else "routing_report"
with RoutingMonitor(model) as monitor, torch.no_grad():
    for step in range(8):
        model(input_ids=torch.randint(0, V, (B, S)))
print(monitor.table())
print(f"report: {monitor.report(out_dir, title='Routing of a tiny random Qwen2-MoE')}")
