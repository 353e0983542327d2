"""The one config object: typed, validated, nested by concern, frozen after parsing.

A run is fully described by a :class:`Config`. It is built from a preset (a YAML
file under ``escapelab/presets`` or any path) plus ``key=value`` overrides on dotted
keys, validated once, saved into the run directory, and never edited afterwards.
Values that follow from the config and the data (steps per epoch, accumulation
factor, evaluation steps) live in :class:`Derived`, saved beside it.

The field descriptions double as the CLI's help (``escapelab config --keys``): they
carry units, advice and the paper's value.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from escapelab.errors import ConfigError

LOSSES_SUPERVISED = ("ce", "onehot_mse")


def _batch_size(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "full":
        return "full"
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        raise ValueError(f"must be a positive integer or 'full', got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a positive integer or 'full', got {value!r}") from None
    if number != float(value) or number < 1:
        raise ValueError(f"must be a positive integer or 'full', got {value!r}")
    return number


BatchSize = Annotated[int | Literal["full"], BeforeValidator(_batch_size)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)


class SyntheticConfig(_Section):
    """Clustered random images, for tests and quick checks."""

    n_train: int = Field(1000, ge=2, description="Training images.")
    n_test: int = Field(500, ge=2, description="Test images.")
    n_classes: int = Field(10, ge=2, description="Number of clusters (= classes).")
    channels: int = Field(1, ge=1, description="Image channels.")
    size: int = Field(8, ge=1, description="Image height = width, in pixels.")
    noise: float = Field(1.0, ge=0, description="Std of the per-pixel noise around each "
                         "class prototype (prototypes have unit variance).")


class DataConfig(_Section):
    name: Literal["digits", "cifar10", "cifar100", "mnist", "fashion-mnist", "synthetic",
                  "npz", "folder"] = Field(
        "digits", description="Data set. 'digits' is scikit-learn's 8x8 digits (1797 images, "
        "embedded, no download); 'cifar10' / 'cifar100' read the official python archives "
        "(the paper uses CIFAR-10); 'mnist' / 'fashion-mnist' read the official IDX files "
        "(28x28 grayscale, 60000 train + 10000 test, 10 classes; Fashion-MNIST is the harder "
        "drop-in for MNIST, and Debian's dataset-fashion-mnist package is found without a "
        "download); 'npz' and 'folder' read your own images from data.path; 'synthetic' "
        "draws clustered images.")
    root: str | None = Field(
        None, description="Folder holding the official files: cifar-10-python.tar.gz / "
        "cifar-100-python.tar.gz or their extracted folders; the four MNIST / Fashion-MNIST "
        "IDX files (.gz or not) in <root>/mnist/ or <root>/fashion-mnist/ (or in <root> "
        "itself). Default: $ESCAPELAB_DATA, else ./data.")
    path: str | None = Field(
        None, description="npz / folder only (required there). npz: an .npz file with "
        "x_train, y_train, x_test, y_test (Keras' layout; images N x H x W, N x H x W x C or "
        "N x C x H x W, uint8 0..255 or float; labels integers 0..K-1, every class in "
        "y_train). folder: a folder with one sub-folder of images per class, all images of "
        "one size (torchvision's ImageFolder layout); split by data.test_size.")
    download: bool = Field(True, description="Download a missing CIFAR archive or MNIST / "
                           "Fashion-MNIST files (MD5-checked) when the network allows.")
    verify_md5: bool = Field(True, description="Check CIFAR archives and the decompressed "
                             "MNIST / Fashion-MNIST files against the official MD5s before "
                             "use; false reads modified copies (say so when reporting).")
    test_size: float = Field(0.3, gt=0, lt=1, description="digits / folder only: fraction "
                             "of images in the fixed stratified test split.")
    split_seed: int = Field(0, ge=0, lt=2**32, description="Seed of the train/test split "
                            "and of subsets (0 <= seed < 2^32); kept apart from `seed` so "
                            "that every run shares one split.")
    subset: int | None = Field(None, ge=1, description="Use a deterministic stratified "
                               "subset of this many training images (the paper's full-batch "
                               "runs use 49152 = 192 x 256 CIFAR-10 images).")
    pad: int = Field(0, ge=0, le=64, description="Zero pixels added on every side of "
                     "every image before standardization (2 turns 28x28 Fashion-MNIST into "
                     "the 32x32 that VGG11's five poolings need; the padded border counts in "
                     "the standardization statistics).")
    normalize: bool = Field(True, description="Per-channel standardization with training-"
                            "split statistics.")
    batch_size: BatchSize = Field(64, description="Images per SGD step, or 'full' for full-"
                                  "batch gradient descent (paper: 256; full = 49152).")
    sampling: Literal["shuffle", "fixed"] = Field(
        "shuffle", description="shuffle: batches without replacement, reshuffled each "
        "epoch; fixed: the same random batch at every step, to separate the effect "
        "of the step size from that of the data (LR range test's fixed-batch mode).")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Split each batch into micro-batches of this size and "
        "accumulate to exactly the batch's mean gradient (memory only; same result).")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @model_validator(mode="after")
    def _path_matches_name(self) -> DataConfig:
        if self.name in ("npz", "folder") and not self.path:
            what = ("an .npz file with x_train, y_train, x_test, y_test" if self.name == "npz"
                    else "a folder with one sub-folder of images per class")
            raise ValueError(f"data.name={self.name} needs data.path: {what}")
        if self.name not in ("npz", "folder") and self.path is not None:
            raise ValueError(f"data.path is read only by data.name=npz or folder; "
                             f"data.name={self.name} would ignore it")
        return self


class ModelConfig(_Section):
    name: str = Field("convnet", description="Architecture: vgg11, vgg13, vgg16, vgg19 "
                      "(paper: vgg11), convnet (conv3x3-ReLU-maxpool blocks) or mlp.")
    widths: list[int] | None = Field(
        None, description="convnet: channels per block (default [16, 32, 64]); mlp: hidden "
        "units per layer (default [256, 256]). Ignored by the VGGs.")
    width_mult: float = Field(1.0, gt=0, description="Multiplies every channel / unit count "
                              "(VGG: 1.0 is the paper's 64-512 channels).")
    batch_norm: bool = Field(False, description="BatchNorm after each conv (VGG/convnet). "
                             "The paper uses none. Uses batch statistics always, so teacher "
                             "targets are recomputed per batch and micro-batching is no "
                             "longer exact.")
    d_out: int = Field(512, ge=1, description="Output width of the linear head (paper: 512). "
                       "Supervised losses use one output per class instead.")

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from escapelab.models import MODEL_NAMES

        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model {value!r}; allowed: {', '.join(MODEL_NAMES)}")
        return value

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError("must be a non-empty list of positive integers")
        return value


class InitConfig(_Section):
    scheme: Literal["kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform"] = (
        Field("kaiming_normal", description="Weight init of teacher and student draws "
              "(paper: He/Kaiming normal, ReLU gain). Biases are zero."))
    mode: Literal["fan_in", "fan_out"] = Field(
        "fan_in", description="Kaiming fan mode (the authors' VGG code uses fan_out).")
    sigma_eps: float = Field(1e-10, ge=0, description="Student offset scale: theta_S = "
                             "theta_T + sigma_eps * theta_tilde (paper: 1e-10). In float32 "
                             "most of a 1e-10 offset rounds away; see dtype.")
    rescale: bool = Field(False, description="Divide the student by sqrt(1 + sigma_eps^2) to "
                          "preserve the init variance (the authors' option).")
    teacher_seed: int | None = Field(None, ge=0, lt=2**63, strict=True,
                                     description="Seed of the teacher draw (an integer, "
                                     "0 <= seed < 2^63); default: derived from `seed`.")


class LossConfig(_Section):
    name: Literal["mse", "nmse", "ndmse", "dino", "ce", "onehot_mse"] = Field(
        "nmse", description="Escape losses (student vs teacher output): mse, nmse (outputs "
        "L2-normalized per sample, paper's main loss), ndmse (norm detached from backprop, "
        "paper App. A), dino (cross-entropy of tempered softmaxes). Supervised (labels, for "
        "the LR range test baseline): ce, onehot_mse.")
    norm_eps: float = Field(1e-12, gt=0, description="nmse/ndmse: floor on the output norm.")
    student_temp: float = Field(0.1, gt=0, description="dino: student softmax temperature.")
    teacher_temp: float = Field(0.04, gt=0, description="dino: teacher softmax temperature.")

    @property
    def supervised(self) -> bool:
        return self.name in LOSSES_SUPERVISED


class OptimConfig(_Section):
    lr: float = Field(3e4, gt=0, description="SGD step size eta. Paper: 1e4 on CIFAR-10 "
                      "(escape needs >~ 500; N-MSE keeps 1e4-1e5 stable). On digits the "
                      "collapse-and-recovery shows at 1e4-3e4; at 100 and below the student "
                      "stays at the teacher; plain MSE diverges at 1e4.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (paper: 0; the "
                            "authors' code defaults to 0.9).")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0).")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay (paper: 0).")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient's global L2 "
                                    "norm (paper: none; clipping changes the escape).")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov needs optim.momentum > 0")
        return self


class ScheduleConfig(_Section):
    name: Literal["constant", "linear_warmup", "cosine_warmup", "exponential"] = Field(
        "constant", description="Step-size schedule (paper: constant; App. A: warm-up). "
        "Warm-ups rise to optim.lr over warmup_steps; exponential goes from start_lr to "
        "optim.lr over the whole run (the LR range test).")
    warmup_steps: int = Field(0, ge=0, description="Length of the warm-up, in steps.")
    start_lr: float = Field(1e-6, gt=0, description="exponential: first step size "
                            "(paper's range test: 1e-6 to 1e6).")

    @model_validator(mode="after")
    def _warmup_needs_steps(self) -> ScheduleConfig:
        if self.name.endswith("warmup") and self.warmup_steps < 1:
            raise ValueError(f"schedule.name={self.name} needs schedule.warmup_steps >= 1")
        return self


class TrainConfig(_Section):
    steps: int | None = Field(3000, ge=1, description="Number of SGD steps (give steps or "
                              "epochs, not both). Paper: 100 epochs of CIFAR-10 at B=256.")
    epochs: float | None = Field(None, gt=0, description="Train for this many epochs instead "
                                 "of `steps` (set steps=null).")
    escape_threshold: float = Field(1e-8, gt=0, description="escape_step is the first step "
                                    "whose training loss exceeds this.")
    max_loss: float | None = Field(None, gt=0, description="End the run (status 'capped') "
                                   "once the training loss exceeds this; the LR range "
                                   "test's optional cap. None: only non-finite values stop.")
    flush_denormal: bool = Field(True, description="Flush denormal floats to zero on the CPU. "
                                 "Near the teacher, gradients are ~1e-20 and denormal "
                                 "arithmetic is up to 10x slower; values below ~1e-38 are "
                                 "lost, nothing the metrics can see.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: "
                                "torch's choice).")
    cache_teacher: bool = Field(False, description="Compute the teacher's outputs once and "
                                "reuse them. Faster (one forward less per step) but not "
                                "faithful: float32 kernels round differently for different "
                                "batch shapes, a ~1e-7 relative noise that swamps the 1e-10 "
                                "offset. Off: the teacher sees each micro-batch with the "
                                "student, as in the authors' code.")
    deterministic: bool = Field(False, description="Ask torch for deterministic GPU kernels "
                                "(CPU runs are deterministic anyway).")
    tf32: bool = Field(False, description="Let CUDA matmuls and cuDNN convolutions use TF32 "
                       "(10-bit mantissa inputs). WARNING: it rounds weights ~1e-3 relative, "
                       "so a student 1e-10 (or 1e-7) from its teacher computes exactly the "
                       "teacher's outputs and the escape never starts. Off (the default): "
                       "full float32 on every CUDA kernel. No effect on CPUs.")
    channels_last: bool = Field(False, description="Keep images and convolution weights in "
                                "channels-last (NHWC) memory. On CPUs PyTorch's max-pooling "
                                "is ~8x faster in this layout (a digits step ~1.4x faster, "
                                "see docs/benchmarks.md); on GPUs cuDNN's NHWC kernels. "
                                "Teacher and student share the layout, so the offset is "
                                "kept; float32 trajectories differ from the default "
                                "layout's at rounding level, as with any other kernel. "
                                "Such runs train alone in sweeps (no runs per process).")


class ProbeConfig(_Section):
    enabled: bool = Field(True, description="Probe the encoder during training.")
    log_until: int = Field(100, ge=1, description="Evaluate at log-spaced steps up to here "
                           "(the escape happens within ~10 steps at eta 1e4) ...")
    log_points: int = Field(20, ge=1, description="... with this many log-spaced points ...")
    every: int = Field(100, ge=1, description="... then every this many steps, and at the end.")
    C: float = Field(1.0, gt=0, description="Inverse L2 strength of the logistic-regression "
                     "probe (scikit-learn's C) on standardized encoder features.")
    max_iter: int = Field(1000, ge=1, description="L-BFGS iterations of the linear probe.")
    solver: Literal["torch", "sklearn"] = Field(
        "torch", description="torch: both probes on the run's device (full-batch L-BFGS for "
        "the logistic regression, scikit-learn's objective, warm-started; a chunked cosine "
        "kNN with scikit-learn's predictions). sklearn: scikit-learn itself on CPU float64 "
        "copies, the reference; with probe.tol=1e-4 it is the probe of runs made before "
        "the torch solver existed.")
    dtype: Literal["float64", "float32"] = Field(
        "float64", description="Precision of the torch probes (statistics and sums stay "
        "float64). float32: L-BFGS iterations ~3x cheaper on a CPU (512-d features), far "
        "cheaper on GPUs with slow float64; objectives within ~1e-5 relative of float64, "
        "the same accuracies to a test image or two.")
    tol: float = Field(1e-5, gt=0, description="Linear probe stops when max |gradient| of "
                       "its objective (mean cross-entropy + ||W||^2/(2 C n)) is below this: "
                       "scikit-learn's `tol` criterion (its default 1e-4 leaves the objective "
                       "~1e-3 relative from the optimum on real 512-d features). Smaller: "
                       "slower, closer to the optimum.")
    warm_start: bool = Field(True, description="Start each evaluation's linear probe from "
                             "the previous one's solution (torch solver): same stopping rule, "
                             "a fraction of the iterations. Saved with resumable "
                             "checkpoints, so resumed runs stay bitwise identical.")
    knn_k: int = Field(20, ge=1, description="Neighbours of the cosine kNN probe (DINO: 20).")
    train_samples: int | None = Field(None, ge=2, description="Fit probes on a stratified "
                                      "subset of the train split of this size (speed).")
    test_samples: int | None = Field(None, ge=2, description="Score probes on a stratified "
                                     "subset of the test split of this size.")
    eval_batch_size: int = Field(1024, ge=1, description="Batch size of feature extraction.")


class SharpnessConfig(_Section):
    """Top Hessian eigenvalues of the training loss during the run (escapelab.sharpness):
    Lanczos on Hessian-vector products over a fixed subset, written to
    metrics/sharpness.jsonl. lambda_0 at the teacher (summary: lambda0, eta_lambda0) is
    measured in every run, whether or not this is enabled."""

    enabled: bool = Field(False, description="Measure the sharpness at the steps below "
                          "(edge of stability: GD is stable along a curvature lambda only "
                          "while lambda < 2/eta). Each measurement costs a few to max_hvp "
                          "Hessian-vector products, each ~2.6 gradients of `samples` images. "
                          "On by default in the digits preset: ~9 products and ~0.14 s per "
                          "measurement there, +7 s (~+11%) for its 47 measurements.")
    log_until: int = Field(100, ge=1, description="Measure at log-spaced steps up to here "
                           "(the escape and collapse happen within ~50 steps at eta 3e4) ...")
    log_points: int = Field(20, ge=1, description="... with this many log-spaced points ...")
    every: int = Field(100, ge=1, description="... then every this many steps, and at the "
                       "end. The defaults equal the probe's, so the collapse C is a "
                       "measured step.")
    samples: BatchSize = Field(256, description="Training images of the fixed subset "
                               "(class-stratified, drawn once from the run's seed; all of "
                               "them if there are fewer), or 'full'. The loss is their "
                               "mean, as in training, so lambda compares with 2/eta at any "
                               "batch size.")
    k: int = Field(1, ge=1, description="Number of top eigenvalues.")
    tol: float = Field(1e-3, gt=0, lt=1, description="Stop when each residual "
                       "||Hv - lambda v|| <= tol * |lambda_1|: the eigenvalue is then within "
                       "tol (usually tol^2) relative. 1e-3 is plenty to compare with 2/eta.")
    max_hvp: int = Field(20, ge=1, description="Most Hessian-vector products per "
                         "measurement (a cold Lanczos needs ~20 at 1e-6 on a conv net); "
                         "records say whether the tolerance was reached.")
    micro_batch_size: int | None = Field(None, ge=1, description="Images per double-backward "
                                         "pass (memory only; same eigenvalues). Default: "
                                         "data.micro_batch_size, else the whole subset "
                                         "(with BatchNorm: the training micro-batch, "
                                         "since batch statistics change the loss).")

    @model_validator(mode="after")
    def _k_fits(self) -> SharpnessConfig:
        if self.k > self.max_hvp:
            raise ValueError(f"sharpness.k={self.k} needs sharpness.max_hvp >= k")
        return self


class CheckpointConfig(_Section):
    collapse: Literal["min_erank", "min_probe", "max_loss"] = Field(
        "min_erank", description="How checkpoint C is chosen among the evaluated steps after "
        "the escape: minimal encoder-output effective rank, minimal probe accuracy, or "
        "maximal training-set loss.")
    every: int = Field(1000, ge=0, description="Save a resumable checkpoint every this many "
                       "steps (0: by time only).")
    every_minutes: float = Field(5.0, ge=0, description="Also save one whenever this many "
                                 "minutes passed since the last (0: off), so that a kill -9 "
                                 "or a lost node never costs more than this much work.")
    steps: list[int] = Field(default_factory=list, description="Extra steps to keep as "
                             "analysis checkpoints (step_<k>).")


def _logger_name(value: Any) -> Any:
    # `logger=tensorboard` is short for `logger.name=tensorboard`
    return {"name": value} if isinstance(value, str) else value


class LoggerConfig(_Section):
    """A live mirror of the run's records (escapelab.loggers). The run directory stays
    the record; `escapelab export RUN_DIR --to tensorboard` makes the same event files
    afterwards."""

    name: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="Mirror every step record (train/...), evaluation (teacher/... "
        "at step 0, eval/...) and the summary (summary/...) while training. tensorboard: "
        "event files in <run>/tensorboard/ (pip install 'escapelab[tensorboard]'; view with "
        "`tensorboard --logdir <run>/tensorboard`); wandb: a W&B run, its files in "
        "<run>/wandb/, online, or offline with WANDB_MODE=offline (pip install "
        "'escapelab[wandb]'). A resumed run continues the same series. Shorthand: "
        "logger=tensorboard.")
    wandb_project: str = Field("escapelab", description="W&B project (logger.name=wandb).")
    wandb_entity: str | None = Field(None, description="W&B entity (user or team); default: "
                                     "your W&B default entity.")


class Config(_Section):
    """Everything that defines a run."""

    name: str = Field("digits", description="A label for the run (the preset's name).")
    seed: int = Field(0, ge=0, lt=2**63, strict=True, description="One seed for teacher, "
                      "student offset, batch order and probes (an integer, 0 <= seed < "
                      "2^63; no silent wrap-around). Same seed, same metrics on the CPU.")
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="Precision of the whole run. float64 realizes the full 1e-10 "
        "student offset (float32 keeps only a few percent of it) at several times the cost.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    sharpness: SharpnessConfig = Field(default_factory=SharpnessConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logger: Annotated[LoggerConfig, BeforeValidator(_logger_name)] = Field(
        default_factory=LoggerConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        head, _, index = value.partition(":")
        bad_index = bool(index) and (head != "cuda" or not index.isdigit())
        if head not in ("auto", "cpu", "cuda") or bad_index:
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if (self.train.steps is None) == (self.train.epochs is None):
            raise ValueError("give exactly one of train.steps and train.epochs "
                             "(set the other to null)")
        micro, batch = self.data.micro_batch_size, self.data.batch_size
        if micro is not None and batch != "full" and micro > batch:
            raise ValueError(f"data.micro_batch_size={micro} exceeds data.batch_size={batch}")
        return self


# ---------------------------------------------------------------------------------------
# Options of the other commands (their field text is the CLI help, their defaults live
# here only)


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FinetuneOptions(_Options):
    """What `escapelab finetune` trains (the field descriptions are its help)."""

    starts: tuple[str, ...] = Field(("T", "C", "S"), description="Checkpoints to start "
                                    "from, comma-separated: T (teacher), C (collapse), S "
                                    "(final student) or any saved step_<k>.")
    seeds: tuple[int, ...] = Field((0, 1, 2), description="Seeds: each sets the new "
                                   "classifier's initialization and the data order, the same "
                                   "for every start.")
    epochs: int = Field(10, ge=1, description="Passes over the training split.")
    batch_size: int = Field(64, ge=1, description="Images per SGD/Adam step.")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Adam, or SGD with "
                                              "--momentum.")
    lr: float | None = Field(None, gt=0, description="Step size (default: 1e-3 for Adam, "
                             "1e-2 for SGD).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay (both optimizers).")
    standardize: bool = Field(True, description="Put a fixed standardization (the start "
                              "encoder's training-split feature mean and std, as the linear "
                              "probes use) in front of the new classifier, so that every start's "
                              "classifier sees features of one scale (an escaped encoder's "
                              "outputs are 10-1000x the teacher's). Off: raw features.")
    evals_per_epoch: int = Field(4, ge=1, description="Test-accuracy measurements per epoch "
                                 "(and one before the first step).")
    train_samples: int | None = Field(None, ge=2, description="Finetune on a stratified "
                                      "subset of the train split of this size.")
    test_samples: int | None = Field(None, ge=2, description="Score on a stratified subset "
                                     "of the test split of this size.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")

    def step_size(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.optimizer == "adam" else 1e-2)


class AnalysisOptions(_Options):
    """What `escapelab analyze` measures, and on what. The field descriptions are the
    CLI's help (`escapelab analyze --help`)."""

    split: Literal["train", "test"] = Field("test", description="Images the metrics are "
                                            "computed on.")
    samples: int | None = Field(None, ge=2, description="Stratified sample of the split "
                                "(default: all of it; the paper: 10k).")
    layers: tuple[str, ...] | None = Field(None, description="Comma-separated tap names "
                                           "(default: all).")
    checkpoints: tuple[str, ...] | None = Field(None, description="Comma-separated, e.g. "
                                                "T,C,S (default: every saved checkpoint).")
    center: bool = Field(False, description="Centre features before spectra (the paper "
                         "does not).")
    dead: Literal["position", "channel"] = Field("position", description="A conv unit is a "
                                                 "channel-and-position (the paper) or a "
                                                 "whole channel.")
    mass: float = Field(0.999, gt=0, le=1, description="Singular-value mass of the "
                        "condition number (paper: 99.9%).")
    pinv_rtol: float | None = Field(
        None, ge=0, lt=1, description="Pseudo-inverse cut-off of the discriminant, relative "
        "to the largest eigenvalue of the (unit-diagonal scaled) within-class covariance. "
        "Default: the Gram route's numerical resolution, max(n, d) * 2.2e-16; eigenvalues "
        "below it are rounding noise. The rank kept is recorded per tap.")
    probe: bool = Field(True, description="Fit the layerwise linear probes (Fig. 3c).")
    probe_samples: int | None = Field(5000, ge=2, description="Training images the "
                                      "layerwise probes are fit on.")
    probe_solver: Literal["torch", "sklearn"] | None = Field(
        None, description="Solver of the layerwise probes (see probe.solver). Default: the "
        "run's probe.solver; C, max_iter, tol and dtype are always the run's, so the "
        "encoder tap's probe is the training-time probe of the same checkpoint (exactly "
        "for the teacher, fit cold in both; to the tolerance where training warm-started).")
    label_free: bool = Field(True, description="Also the k-means variant of separability "
                             "(paper footnote 1).")
    kmeans_solver: Literal["torch", "sklearn"] = Field(
        "torch", description="k-means of the label-free variant: torch (on the features' "
        "device; scikit-learn's algorithm and settings) or sklearn (KMeans itself, "
        "float64 on the CPU: the reference, slow for wide conv taps).")
    batch_size: int = Field(500, ge=1, description="Images per forward pass.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    memory_gb: float = Field(2.0, gt=0, description="Budget for the stored features of one "
                             "group of taps, GiB.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the sample and of k-means.")


class RangeOptions(_Options):
    """The LR range test's step sizes, budget and detection rules. The field
    descriptions are the CLI's help (`escapelab lr-range --help`)."""

    start_lr: float = Field(1e-6, gt=0, description="First step size (paper: 1e-6).")
    end_lr: float = Field(1e6, gt=0, description="Last step size (paper: 1e6).")
    steps: int | None = Field(None, ge=2, description="Steps per curve (default 500 "
                              "unless --epochs is given).")
    epochs: float | None = Field(None, gt=0, description="Epochs per curve (paper: 5).")
    seeds: tuple[int, ...] = Field((0,), min_length=1, description="Comma-separated seeds; "
                                   "several give a band.")
    mode: Literal["minibatch", "fixed", "full"] = Field(
        "minibatch", description="Fresh batches, one fixed batch, or full-batch gradient "
        "descent.")
    supervised: Literal["ce", "onehot_mse", "none"] = Field(
        "ce", description="The side-by-side supervised curve (none: only the escape).")
    cap: float | None = Field(None, gt=0, description="Stop a curve once its loss exceeds "
                              "this (default: only non-finite values stop it).")
    window: int = Field(5, ge=1, description="Running-median window of the detection, "
                        "steps.")
    floor: float = Field(1e-12, gt=0, description="Losses below this count as this.")
    start_steps: int | None = Field(None, ge=1, description="Steps that define the starting "
                                    "band (default: the first 5%, at least `window`).")
    depart_factor: float = Field(2.0, gt=1, description="Departure: the smoothed loss "
                                 "leaves the starting band widened by this factor.")
    diverge_factor: float = Field(10.0, gt=1, description="Divergence: the smoothed loss "
                                  "rises this factor above its lowest since departure.")

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("steps") is None \
                and data.get("epochs") is None:
            return {**data, "steps": 500}
        return data

    @model_validator(mode="after")
    def _budget(self) -> RangeOptions:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if not self.start_lr < self.end_lr:
            raise ValueError(f"need start_lr < end_lr, got {self.start_lr:g} and "
                             f"{self.end_lr:g}")
        return self


class SlurmOptions(_Options):
    """How sweep points go to Slurm. The field descriptions are the CLI's help
    (`escapelab sweep --help`)."""

    partition: str | None = Field(None, description="Slurm partition (default: the "
                                  "cluster's).")
    time_min: int = Field(60, ge=1, description="Slurm time limit per run, minutes.")
    cpus: int = Field(1, ge=1, description="Slurm CPUs per run (torch threads).")
    mem_gb: int | None = Field(None, ge=1, description="Memory per run, GiB (default: the "
                               "partition's).")
    parallel: int = Field(64, ge=1, description="Array tasks running at once.")
    wait_s: float | None = Field(None, gt=0, description="Stop waiting for Slurm after "
                                 "this many seconds (unfinished runs are recorded as "
                                 "failed; relaunch later).")
    poll_s: float = Field(2.0, gt=0, description="Seconds between queue polls.")


# ---------------------------------------------------------------------------------------
# Derived values


class Derived(_Section):
    """Values that follow from the config and the data; logged next to the config."""

    n_train: int
    n_test: int
    num_classes: int
    input_shape: tuple[int, int, int]
    head_dim: int
    batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    eval_steps: list[int]
    sharpness_steps: list[int] = Field(default_factory=list)
    device: str
    teacher_seed: int
    student_seed: int
    data_seed: int
    probe_seed: int
    sharpness_seed: int = 0
    config_sha256: str = Field("", description="SHA-256 of config.yaml as written at the "
                               "start; resume refuses a config that no longer matches it.")


def config_digest(cfg: Config) -> str:
    """SHA-256 of the resolved config as written to config.yaml."""
    import hashlib

    return hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one random stream (teacher, student, data...) of a run."""
    key = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, *stream.encode()]
    return int(np.random.SeedSequence(key).generate_state(2, np.uint64)[0] >> np.uint64(1))


def eval_schedule(total_steps: int, log_until: int, log_points: int, every: int) -> list[int]:
    """Steps at which the student is evaluated: 0, log-spaced up to `log_until`, then
    every `every` steps, and the last step."""
    steps = {0, total_steps}
    top = min(log_until, total_steps)
    steps.update(int(round(s)) for s in np.geomspace(1, top, num=log_points))
    steps.update(range(every, total_steps + 1, every))
    return sorted(s for s in steps if 0 <= s <= total_steps)


def derive(cfg: Config, *, n_train: int, n_test: int, num_classes: int,
           input_shape: tuple[int, int, int], device: str) -> Derived:
    """Compute the derived values, checking the config against the data's sizes."""
    batch = n_train if cfg.data.batch_size == "full" else cfg.data.batch_size
    if batch > n_train:
        raise ConfigError(f"data.batch_size={batch} exceeds the {n_train} training images; "
                          "use a smaller value or 'full'")
    micro = min(cfg.data.micro_batch_size or batch, batch)
    steps_per_epoch = n_train // batch  # incomplete last batches are dropped
    if cfg.train.steps is not None:
        total = cfg.train.steps
    else:
        assert cfg.train.epochs is not None
        total = max(1, int(math.ceil(cfg.train.epochs * steps_per_epoch)))
    for step in cfg.checkpoint.steps:
        if not 0 <= step <= total:
            raise ConfigError(f"checkpoint.steps contains {step}, outside 0..{total}")
    for key in ("train_samples", "test_samples"):
        value = getattr(cfg.probe, key)
        limit = n_train if key == "train_samples" else n_test
        if value is not None and value > limit:
            raise ConfigError(f"probe.{key}={value} exceeds the {limit} images of that split")
    return Derived(
        n_train=n_train,
        n_test=n_test,
        num_classes=num_classes,
        input_shape=input_shape,
        head_dim=num_classes if cfg.loss.supervised else cfg.model.d_out,
        batch_size=batch,
        micro_batch_size=micro,
        accumulation_steps=math.ceil(batch / micro),
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=total / steps_per_epoch,
        eval_steps=eval_schedule(total, cfg.probe.log_until, cfg.probe.log_points,
                                 cfg.probe.every) if cfg.probe.enabled else [],
        sharpness_steps=eval_schedule(total, cfg.sharpness.log_until,
                                      cfg.sharpness.log_points, cfg.sharpness.every)
        if cfg.sharpness.enabled else [],
        device=device,
        teacher_seed=cfg.init.teacher_seed if cfg.init.teacher_seed is not None
        else stream_seed(cfg.seed, "teacher"),
        student_seed=stream_seed(cfg.seed, "student"),
        data_seed=stream_seed(cfg.seed, "data"),
        probe_seed=stream_seed(cfg.seed, "probe"),
        sharpness_seed=stream_seed(cfg.seed, "sharpness"),
        config_sha256=config_digest(cfg),
    )


# ---------------------------------------------------------------------------------------
# Presets, overrides and error messages


def preset_names() -> list[str]:
    """Names of the presets shipped with escapelab."""
    folder = resources.files("escapelab") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_preset(preset: str | Path) -> dict[str, Any]:
    """The raw mapping of a preset (name or YAML path), before validation."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file {str(path)!r} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"preset file {str(path)!r} is not UTF-8 text (byte "
                              f"{exc.start}); save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"cannot read preset file {str(path)!r}: "
                              f"{exc.strerror or exc}") from None
    else:
        names = preset_names()
        if str(preset) not in names:
            raise ConfigError(f"unknown preset {str(preset)!r}; allowed: {', '.join(names)} "
                              "(or a path to a YAML file)")
        text = (resources.files("escapelab") / "presets" / f"{preset}.yaml").read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset {str(preset)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {str(preset)!r} must be a mapping of config keys")
    return data


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["optim.lr=1e4", "data.batch_size=full"]`` into a nested dict.

    Values are read as YAML (numbers, booleans, null, lists like ``[16,32,64]``), so
    ``1e4`` becomes a float and ``full`` stays a string.
    """
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value "
                              "(e.g. optim.lr=1e4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            value = _number_or_str(value)
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of "
                                  f"{part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def _number_or_str(text: str) -> Any:
    # YAML 1.1 reads "1e4" as a string; researchers mean the number.
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base`."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _section_fields(path: tuple[str | int, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def did_you_mean(name: str, allowed: list[str], prefix: tuple[Any, ...] = ()) -> str:
    """' (did you mean 'x.y'?)' for the closest allowed name, or ''. Also finds a key
    given in the wrong section (e.g. `data.lr` -> `optim.lr`)."""
    import difflib

    dotted = ".".join(str(p) for p in prefix)
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {'.'.join(filter(None, [dotted, close[0]]))!r}?)"
    everywhere = [key for key, _, _ in describe_keys()]
    elsewhere = [k for k in everywhere if k.rsplit(".", 1)[-1] == name]
    if elsewhere:
        return f" (did you mean {elsewhere[0]!r}?)"
    close = difflib.get_close_matches(".".join([*map(str, prefix), name]), everywhere, n=1,
                                      cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the dotted key and what is allowed."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        key = ".".join(str(p) for p in loc) or "config"
        if err["type"] == "extra_forbidden":
            allowed = _section_fields(loc[:-1])
            lines.append(f"unknown key {key!r}{did_you_mean(str(loc[-1]), allowed, loc[:-1])}; "
                         f"allowed keys here: {', '.join(allowed)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("model_type", "dict_type"):
            msg = f"must be a mapping of keys ({', '.join(_section_fields(loc))})"
        got = err.get("input")
        shown = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{key}: {msg}{shown}")
    return "invalid config: " + "; ".join(lines)


def build_config(data: dict[str, Any]) -> Config:
    """Validate a nested dict into a :class:`Config`, raising :class:`ConfigError`."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(preset: str | Path | None = "digits",
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset (name or YAML path; None = built-in defaults) and apply overrides."""
    data = read_preset(preset) if preset is not None else {}
    return build_config(merge(data, parse_overrides(overrides)))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every config key, for help screens."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str, instance: BaseModel) -> None:
        for name, field in model.model_fields.items():
            value = getattr(instance, name)
            if isinstance(value, BaseModel):
                walk(type(value), f"{prefix}{name}.", value)
            else:
                rows.append((f"{prefix}{name}", repr(value) if value is not None else "null",
                             field.description or ""))

    walk(Config, "", Config())
    return rows
