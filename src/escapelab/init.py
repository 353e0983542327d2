"""Teacher and student draws (paper Sec. 2, eq. 2).

The teacher theta_T is one draw of the init distribution (He/Kaiming by default) from
its own seeded generator, frozen. The student starts next to it,

    theta_S0 = theta_T + sigma_eps * theta_tilde,

theta_tilde an independent draw of the same distribution (biases are zero in both
draws, so only weights move). Draws are made in float64 on the CPU, so that the
teacher is the same network in float32 and float64 and on every device; the sum is
formed in the run's dtype, as the authors do. In float32 a 1e-10 offset is below half
an ulp of almost every weight and rounds away: :func:`offset_stats` records what was
actually realized.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from escapelab.config import InitConfig
from escapelab.models import EscapeNet


def init_weights(model: nn.Module, cfg: InitConfig, generator: torch.Generator) -> None:
    """Draw every conv/linear weight of `model` in place; zero biases, unit BN scales."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            weight = module.weight
            if cfg.scheme == "kaiming_normal":
                nn.init.kaiming_normal_(weight, mode=cfg.mode, nonlinearity="relu",
                                        generator=generator)
            elif cfg.scheme == "kaiming_uniform":
                nn.init.kaiming_uniform_(weight, mode=cfg.mode, nonlinearity="relu",
                                         generator=generator)
            elif cfg.scheme == "xavier_normal":
                nn.init.xavier_normal_(weight, generator=generator)
            else:
                nn.init.xavier_uniform_(weight, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def draw(template: EscapeNet, cfg: InitConfig, seed: int) -> EscapeNet:
    """A float64 CPU copy of `template` with weights drawn from `seed`."""
    model = copy.deepcopy(template).to(device="cpu", dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        init_weights(model, cfg, generator)
    return model


def make_teacher_student(template: EscapeNet, cfg: InitConfig, teacher_seed: int,
                         student_seed: int, dtype: torch.dtype, device: torch.device | str,
                         ) -> tuple[EscapeNet, EscapeNet]:
    """Return (teacher, student): the teacher frozen, the student next to it.

    The student is ``theta_T + sigma_eps * theta_tilde`` (divided by
    sqrt(1 + sigma_eps^2) if ``cfg.rescale``), computed in `dtype`.
    """
    teacher = draw(template, cfg, teacher_seed).to(device=device, dtype=dtype)
    tilde = draw(template, cfg, student_seed).to(device=device, dtype=dtype)
    student = copy.deepcopy(teacher)
    scale = 1.0 / math.sqrt(1.0 + cfg.sigma_eps**2) if cfg.rescale else 1.0
    with torch.no_grad():
        for p_s, p_tilde in zip(student.parameters(), tilde.parameters(), strict=True):
            p_s.add_(p_tilde, alpha=cfg.sigma_eps)
            if cfg.rescale:
                p_s.mul_(scale)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher, student


def offset_stats(teacher: nn.Module, student: nn.Module, template: EscapeNet, cfg: InitConfig,
                 student_seed: int) -> dict[str, float | None]:
    """How much of the intended offset ``sigma_eps * theta_tilde`` was realized.

    Returns the intended and realized L2 norms (float64), their ratio, and the
    fraction of parameters whose value actually differs from the teacher's.
    """
    tilde = draw(template, cfg, student_seed).requires_grad_(False)
    intended_sq = sum(float((p.double() * cfg.sigma_eps).pow(2).sum())
                      for p in tilde.parameters())
    realized_sq, changed, total = 0.0, 0, 0
    for p_t, p_s in zip(teacher.parameters(), student.parameters(), strict=True):
        diff = p_s.detach().double() - p_t.detach().double()
        realized_sq += float(diff.pow(2).sum())
        changed += int((p_s != p_t).sum())
        total += p_t.numel()
    intended, realized = math.sqrt(intended_sq), math.sqrt(realized_sq)
    return {
        "offset_intended": intended,
        "offset_realized": realized,
        "offset_ratio": realized / intended if intended > 0 else None,
        "changed_frac": changed / total,
        "n_params": total,
    }


def distance(model: nn.Module, reference: nn.Module) -> torch.Tensor:
    """||theta - theta_ref||_2 over all parameters as a 0-d float64 tensor on the
    model's device (no host sync, so the training loop can batch its syncs)."""
    # The difference in the weights' own dtype: exact near the reference (Sterbenz), at
    # most half an ulp of the difference elsewhere; its squares in float64, since a
    # float32 student's differences of ~1e-11 would underflow. Fused (foreach) kernels:
    # the loop records this every step.
    with torch.no_grad():
        diffs = torch._foreach_sub(list(model.parameters()), list(reference.parameters()))
        norms = torch._foreach_norm(diffs, 2, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack(norms))
