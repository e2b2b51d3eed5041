"""Expert banks and the grouped matmul they run on."""
from .bank import EXPERTS, ExpertBank, GLUExperts, InputGated, MLPExperts, ModuleExperts, build_experts, input_gated, local
from .grouped_mm import grouped_mm, grouped_mm_reference

__all__ = ["EXPERTS", "ExpertBank", "GLUExperts", "InputGated", "MLPExperts", "ModuleExperts", "build_experts",
           "grouped_mm", "grouped_mm_reference", "input_gated", "local"]
