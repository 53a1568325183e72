"""Kubernetes manifests stage: a kustomize tree (base + one overlay per deployment profile) for Triton on GPUs.

`render_manifests(ManifestsConfig) -> ManifestsResult` writes the tree; `checks.check_tree` validates it
(the project's policy checks, kustomize, kubernetes-validate and the Prometheus operator CRD schemas)."""

from .config import CheckReport, ManifestsConfig, ManifestsResult, Storage
from .render import render_manifests, render_tree

__all__ = ["CheckReport", "ManifestsConfig", "ManifestsResult", "Storage", "render_manifests", "render_tree"]
