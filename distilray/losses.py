"""Knowledge-distillation losses as pure torch functions (no Ray), tested against hand-computed KL.

    loss = alpha · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha) · CE(student, labels)

KL is averaged over the batch (`batchmean`, the true KL per example). The T² factor keeps the
soft term's gradients the same size as the hard term's when T changes (Hinton et al., 2015):
the gradient of KL at temperature T scales as 1/T², which T² cancels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student) at temperature T, averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """alpha · T² · KL(soft targets) + (1 − alpha) · cross-entropy on the hard labels."""
    hard = F.cross_entropy(student_logits, labels)
    if alpha == 0.0:
        return hard  # exactly CE: no teacher term, not even a 0 · KL in the graph
    soft = soft_target_kl(student_logits, teacher_logits, temperature)
    if alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * hard


def cosine_hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean (1 − cos) between student and teacher hidden states over real (unpadded) tokens.

    DistilBERT's cosine embedding loss: it aligns the directions of the last hidden states.
    Both must have the same width. An all-padding batch gives 0, not NaN.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student_hidden.shape)}, "
                         f"teacher {tuple(teacher_hidden.shape)}")
    cos = F.cosine_similarity(student_hidden, teacher_hidden.detach(), dim=-1)
    mask = attention_mask.to(cos.dtype)
    return ((1.0 - cos) * mask).sum() / mask.sum().clamp(min=1.0)
