"""Inside the adapters: pure functions on LoRA factors, weights and hidden states.

ΔW = s·B·A with A: [r, in], B: [out, r], s = alpha/r. By concern: `factors` (reading them from
a PEFT model with each variant's update: DoRA's dense ΔW, PiSSA/OLoRA relative to the pretrained
weight; refusing the variants they cannot describe), `spectra` (SVD and ranks), `modules` (module
names, per-kind aggregation), `similarity` (φ between two adapters), `amplification` (ΔW vs
W), `representations` (CKA). `analyze` inspects a run (`loralab analyze`), `sections` builds
its analysis.json parts and `plots` draws them. The pure functions are re-exported here.
"""

from .amplification import amplification, svd_amplification
from .factors import (
    RESIDUAL_INITS,
    UPDATES,
    LoraFactors,
    UnsupportedVariant,
    base_weight,
    dora_update,
    lora_factors,
    short_name,
    unsupported_variant,
)
from .modules import group_by_kind, kind_means, mean, module_kind, module_layer, module_role
from .representations import (
    cka_per_layer,
    linear_cka,
    median_cosine_per_layer,
    pooled_hidden_states,
)
from .similarity import (
    adapter_similarity,
    output_similarity,
    right_singular_vectors,
    subspace_similarity,
)
from .spectra import (
    delta_singular_values,
    delta_svd,
    effective_rank,
    module_stats,
    numerical_rank,
    stable_rank,
    update_singular_values,
    update_svd,
)

__all__ = [
    "RESIDUAL_INITS", "UPDATES", "LoraFactors", "UnsupportedVariant", "adapter_similarity",
    "amplification", "base_weight", "cka_per_layer", "delta_singular_values", "delta_svd",
    "dora_update", "effective_rank",
    "group_by_kind", "kind_means", "linear_cka", "lora_factors", "mean", "median_cosine_per_layer",
    "module_kind", "module_layer", "module_role", "module_stats", "numerical_rank",
    "output_similarity", "pooled_hidden_states", "right_singular_vectors", "short_name",
    "stable_rank", "subspace_similarity", "svd_amplification", "unsupported_variant",
    "update_singular_values", "update_svd",
]  # fmt: skip
