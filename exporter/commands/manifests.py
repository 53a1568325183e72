from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import StageFailed
from ..core.ui import out as console
from ..manifests import ManifestsConfig, ManifestsResult, Storage, render_manifests
from ..manifests.config import DEFAULT_IMAGE_REPOSITORY, DEFAULT_TENSORRT_VERSION, TRITON_RELEASE_FOR_TENSORRT
from .common import App, emit, pass_app


def _human(r: ManifestsResult) -> None:
    console.print(f"[bold]{r.model}[/bold]: {len(r.files)} files in {r.out} (overlays: {', '.join(r.overlays)})")
    console.print(f"  Triton image: {r.triton_image}")
    console.print(f"  Dockerfiles: {r.out}/images/ (build and push them with `make image`)")
    for overlay in r.overlays:
        console.print(f"  kubectl apply -k {r.out}/overlays/{overlay}")
    if r.check:
        c = r.check
        console.print(
            f"  checks passed: {len(c.overlays_built)} overlays built, {c.objects_checked} objects, "
            f"{c.kubernetes_validated} kubernetes-validate --strict, {c.crd_validated} CRD schema"
        )
        for note in c.skipped:
            console.print(f"  [yellow]skipped:[/yellow] {note}")


@click.command("manifests")
@click.option("--model", default="r1-distill-tiny", show_default=True, help="Model the Triton repository serves.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("k8s"), show_default=True,
              help="Directory for base/ and overlays/ (replaced atomically).")
@click.option("--tensorrt-version", default=DEFAULT_TENSORRT_VERSION, show_default=True,
              help=f"TensorRT the engines use; picks the Triton tag ({', '.join(TRITON_RELEASE_FOR_TENSORRT)}).")
@click.option("--image-repository", default=DEFAULT_IMAGE_REPOSITORY, show_default=True,
              help="Registry/namespace `make image` pushed k8s/images/{triton,engine-build} to.")
@click.option("--image-tag", default=None, help="Tag of both images [default: <r1deploy version>-<Triton release>].")
@click.option("--triton-digest", default=None,
              help="sha256:… of the pushed triton image; pins it by digest (recommended) instead of the tag.")
@click.option("--engine-build-digest", default=None, help="sha256:… of the pushed engine-build image (recommended).")
@click.option("--image", default=None, help="Full Triton image reference (overrides the four options above).")
@click.option("--r1deploy-image", default=None, help="Full engine-build image reference (overrides them too).")
@click.option("--storage", type=click.Choice([s.value for s in Storage]), default="pvc", show_default=True,
              help="Where the model repository comes from; s3/gcs sync onto the claim in an init container.")
@click.option("--storage-uri", default=None, help="s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (with --storage s3|gcs).")
@click.option("--storage-secret", default="r1deploy-storage-credentials", show_default=True,
              help="Secret (created outside the manifests) holding the bucket credentials as env variables.")
@click.option("--storage-size", default="200Gi", show_default=True, help="Size of the model-repository claim.")
@click.option("--kind", "model_kind", type=click.Choice(["auto", "decoder", "encoder"]), default="auto", show_default=True,
              help="Model family (decides which Triton models research loads); auto: from the preset name.")
@click.option("--load-model", "load_models", multiple=True,
              help="Extra model research loads side by side (explicit model control); repeatable.")
@click.option("--profile", "profile_names", multiple=True,
              help="Render only these deployment profiles' overlays; repeatable [default: every profile].")
@click.option("--runtime", type=click.Choice(["auto", "r1deploy", "tensorrt-llm"]), default="auto", show_default=True,
              help="What serves a decoder: TensorRT-LLM (Triton's tensorrtllm_backend, tensor parallel over the pod's "
                   "GPUs; unverified, never run on a GPU), r1deploy's generate model, or auto: TensorRT-LLM where the "
                   "plan needs more than one GPU of a TensorRT profile (production, research).")
@click.option("--check", is_flag=True, help="Build every overlay with kustomize and run all checks; exit 1 on a violation.")
@pass_app
def command(app: App, model, out, tensorrt_version, image_repository, image_tag, triton_digest, engine_build_digest,
            image, r1deploy_image, storage, storage_uri, storage_secret,
            storage_size, model_kind, load_models, profile_names, runtime, check):
    """Render Kubernetes manifests: kustomize base + one overlay per deployment profile.

    A decoder is planned on each profile's GPU first (`r1deploy plan`): memory requests follow its weights, and a
    profile on which not one sequence fits is refused (exit 2, with the numbers) — pick profiles with --profile."""
    profiles = {n: app.profile(n) for n in profile_names} if profile_names else app.profiles
    cfg = ManifestsConfig(
        model=model, out=out, profiles=profiles, tensorrt_version=tensorrt_version, image=image,
        r1deploy_image=r1deploy_image, image_repository=image_repository, image_tag=image_tag,
        triton_digest=triton_digest, engine_build_digest=engine_build_digest, storage=Storage(storage), storage_uri=storage_uri,
        storage_secret=storage_secret, storage_size=storage_size,
        model_kind=None if model_kind == "auto" else model_kind, load_models=tuple(load_models), runtime=runtime,
    )
    result = render_manifests(cfg)
    if check:
        from ..manifests.checks import check_tree

        result.check = check_tree(result.out)
        if result.check.violations:
            n = len(result.check.violations)
            raise StageFailed(f"{n} manifest check(s) failed; first: {result.check.violations[0]}")
    emit(app, result, _human)
