"""Stages that have not landed yet say so, naming the issue that plans them."""

from distilray.errors import DistilrayError

ISSUES = {
    "tune": "Ray Tune: learning-rate × weight-decay search with early stopping, resume and a real report",
    "serve": "Ray Serve: the best checkpoint as autoscaling, batched, hardened HTTP inference",
    "distill": "Knowledge distillation: a fine-tuned teacher trains a smaller, faster student",
    "cluster": "Run anywhere: `ray job submit` on a multi-node cluster, and KubeRay manifests",
}


def not_implemented(stage: str, command: str) -> DistilrayError:
    return DistilrayError(f"'distilray {command}' is not implemented yet (planned in: {ISSUES[stage]})")
