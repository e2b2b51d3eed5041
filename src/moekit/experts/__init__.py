"""Expert banks and the grouped matmul they run on."""
from .bank import EXPERTS, ExpertBank, GLUExperts, MLPExperts, ModuleExperts, build_experts
from .grouped_mm import grouped_mm, grouped_mm_reference

__all__ = ["EXPERTS", "ExpertBank", "GLUExperts", "MLPExperts", "ModuleExperts", "build_experts",
           "grouped_mm", "grouped_mm_reference"]
