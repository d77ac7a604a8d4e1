"""What `evaluate` measures, typed: one dataclass per section of metrics.json. `EvaluationResults.to_json()` writes
numbers and paths only, leaving out what was not measured (a field that is None)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass


@dataclass
class ModelFidelity:
    """One generated set against one concept's real training slices."""
    n: int
    values: dict[str, float]  # the registry's distances (and PRDC)
    ci: dict[str, list[float]]  # 95 % bootstrap interval of each, resampling the generated images
    size: int | None = None  # set when the model was scored at its own, smaller size...
    floor: dict[str, float] | None = None  # ...against the real-vs-real floor recomputed there


@dataclass
class ConceptFidelity:
    n_real: int
    curves: dict[str, dict]  # per set: mean power spectrum and two-point curve, for the report's plots
    models: dict[str, ModelFidelity] = field(default_factory=dict)
    swd_images: int | None = None  # images per set in every SWD of this concept
    floor: dict[str, float] | None = None  # real training vs real validation slices

    def floor_of(self, model: str) -> dict[str, float]:
        """The floor a model's distances are divided by: its own (scored at its own size) or the concept's."""
        return self.models[model].floor or self.floor or {}


@dataclass
class ModelAccuracy:
    accuracy: float  # share of generated images the classifier reads as the concept they were asked for
    confusion: list[list[int]]  # true class (rows) x predicted class, in ClassifierResult.classes' order
    size: int | None = None  # as in ModelFidelity
    ceiling_accuracy: float | None = None
    # a latent model's accuracy by a classifier trained on the real slices passed through its VAE (encode, decode),
    # and that classifier's ceiling on the validation slices passed through it: what the model learned of each
    # concept, apart from what its decoder can draw
    decoder_accuracy: float | None = None
    decoder_ceiling: float | None = None


@dataclass
class ClassifierResult:
    classes: list[str]
    models: dict[str, ModelAccuracy] = field(default_factory=dict)
    ceiling_accuracy: float | None = None  # on the real validation slices

    def ceiling_of(self, model: str) -> float | None:
        own = self.models[model].ceiling_accuracy if model in self.models else None
        return self.ceiling_accuracy if own is None else own


@dataclass
class NearCopy:
    generated: str  # path (or index) of the generated image
    training: str  # path of its training twin
    ncc: float


@dataclass
class ModelMemorisation:
    innovation: float  # mean RMS distance to the nearest training slice
    nearest_l2: list[float]
    nearest_index: list[int]
    best_ncc: list[float]  # best shift-tolerant normalised cross-correlation with any training slice
    near_copies: list[NearCopy]
    near_copy_rate: float


@dataclass
class MemorisationResult:
    copy_threshold: float
    models: dict[str, ModelMemorisation] = field(default_factory=dict)
    validation_innovation: float | None = None  # the same numbers for real validation slices: the reference
    validation_ncc_p99: float | None = None


@dataclass
class Ordering:
    phase: str  # "darkest phase (voids / air)" or "brightest phase (yarns)"
    order: str  # "dry > injected": as the real slices have it
    holds: bool  # whether the generated set keeps it


@dataclass
class Cuts:
    """3D consistency of one set: per state, the mean phase fractions of each cut and their spread."""
    fractions: dict[str, dict[str, list[float]]]  # state -> orientation -> mean fraction per phase
    cut_spread: dict[str, list[float]]  # state -> largest difference between its cuts, per phase
    orderings: list[Ordering] | None = None  # generated sets: do orderings between states in real data hold?


@dataclass
class ConsistencyResult:
    real: Cuts
    models: dict[str, Cuts] = field(default_factory=dict)


@dataclass
class ModelProbes:
    prompts: dict[str, dict[str, float]]  # prompt -> the registry's probe metrics
    grids: dict[str, dict[str, list[str]]]  # prompt -> {"base", "tuned"} -> image paths, drawn by the report
    class_prompts: list[str]  # the DreamBooth class prompts its runs trained with


@dataclass
class ProbeResult:
    """Prompt-drift probes: each fine-tuned SD model against the base on the same prompts and seeds."""
    base: str
    models: dict[str, ModelProbes] = field(default_factory=dict)
    side: int | None = None  # the probes' image size


@dataclass
class EvaluationResults:
    settings: dict  # what was compared: paths, sizes, counts, bootstrap rounds, phase thresholds
    fidelity: dict[str, ConceptFidelity]  # per concept ("all" when the sets carry no classes)
    classifier: ClassifierResult | None  # None: fewer than two real classes
    memorisation: MemorisationResult
    consistency: ConsistencyResult | None  # None: the real slices carry no state / orientation classes
    skipped: list[dict] = field(default_factory=list)  # {"what", "reason"}: shown in the report
    notes: list[str] = field(default_factory=list)  # warnings for the top of the report
    probes: ProbeResult | None = None  # the config form's prompt-drift probes (config.probe_metrics)

    def to_json(self) -> dict:
        return _plain(self)


def _plain(value):
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if getattr(value, f.name) is not None}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
