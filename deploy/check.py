#!/usr/bin/env python3
"""Renders every overlay under deploy/k8s/overlays with `kubectl kustomize`, validates each object
against the Kubernetes OpenAPI schemas offline (kubernetes-validate, strict: unknown fields are
errors), and lints what an operator expects of bt's manifests. Prints one line per overlay; exits 1
with every problem listed.

    python deploy/check.py [--render-dir DIR]    # DIR: also write each rendered overlay there
"""
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

K8S_VERSION = "1.31.0"
ROOT = Path(__file__).resolve().parent / "k8s"
WORKLOADS = {"StatefulSet", "Deployment", "DaemonSet"}
# The coordinator's drain deadline after SIGTERM (coordinator/src/server.rs).
DRAIN_SECONDS = 5


def render(overlay: Path) -> list:
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True
    ).stdout
    return out, [d for d in yaml.safe_load_all(out) if d]


def arg_value(args, flag):
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def lint(overlay: str, docs: list) -> list:
    problems = []
    kinds = {d["kind"] for d in docs}
    for need in ["StatefulSet", "DaemonSet", "Service", "PodDisruptionBudget", "NetworkPolicy",
                 "ServiceAccount", "PersistentVolumeClaim", "Namespace"]:
        if need not in kinds:
            problems.append(f"no {need}")
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        labels = d["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/part-of") != "bt":
            problems.append(f"{name}: no app.kubernetes.io/part-of=bt label")
        if d["kind"] == "Secret":
            problems.append(f"{name}: a Secret is committed; create secrets out of band")
        if d["kind"] not in WORKLOADS:
            continue
        pod = d["spec"]["template"]["spec"]
        if "app.kubernetes.io/name" not in d["spec"]["template"]["metadata"].get("labels", {}):
            problems.append(f"{name}: pods carry no app.kubernetes.io/name label")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not set")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a service account token it does not need")
        if not pod.get("serviceAccountName"):
            problems.append(f"{name}: runs as the default service account")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for c in pod["containers"]:
            cn = f"{name}[{c['name']}]"
            image = c.get("image", "")
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            if not tag:
                problems.append(f"{cn}: image {image!r} has no tag")
            if overlay == "gpu" and tag == "latest":
                problems.append(f"{cn}: image tag 'latest' in the gpu overlay")
            req = c.get("resources", {}).get("requests", {})
            if "cpu" not in req or "memory" not in req:
                problems.append(f"{cn}: no cpu/memory requests")
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cn}: root filesystem is writable")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cn}: allowPrivilegeEscalation is not false")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{cn}: capabilities are not all dropped")
            args = c.get("args", [])
            if d["kind"] == "DaemonSet":
                # A daemon has no listener to probe (a restart would stop its trainers); its
                # trainers must get their stop grace before the kubelet kills the pod.
                stop_ms = int(arg_value(args, "--stop-grace-ms") or 10000)
                if grace * 1000 <= stop_ms + 5000:
                    problems.append(f"{cn}: terminationGracePeriodSeconds {grace} is not longer than the stop grace")
                if pod.get("hostNetwork") is not True:
                    problems.append(f"{cn}: no host networking for NCCL and the store port range")
                if overlay == "gpu" and "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}):
                    problems.append(f"{cn}: no nvidia.com/gpu limit")
            else:
                for p in ["readinessProbe", "livenessProbe"]:
                    if p not in c:
                        problems.append(f"{cn}: no {p}")
                if grace <= DRAIN_SECONDS:
                    problems.append(f"{cn}: terminationGracePeriodSeconds {grace} is not longer than the drain deadline")
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        if "/checkpoints" not in mounts:
            problems.append(f"{name}: the checkpoint volume is not mounted at /checkpoints")
    return problems


def main() -> int:
    render_dir = None
    if len(sys.argv) == 3 and sys.argv[1] == "--render-dir":
        render_dir = Path(sys.argv[2])
        render_dir.mkdir(parents=True, exist_ok=True)
    overlays = sorted(p for p in (ROOT / "overlays").iterdir() if p.is_dir())
    failed = False
    for o in overlays:
        text, docs = render(o)
        if render_dir:
            (render_dir / f"{o.name}.yaml").write_text(text)
        problems = []
        for d in docs:
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{d['kind']}/{d['metadata']['name']}: {e.message} at {'/'.join(map(str, e.path))}")
            except Exception as e:  # an unknown kind or version
                problems.append(f"{d['kind']}/{d['metadata']['name']}: {e}")
        problems += lint(o.name, docs)
        if problems:
            failed = True
            print(f"deploy: overlay {o.name}: {len(problems)} problems")
            for p in problems:
                print(f"  - {p}")
        else:
            print(f"deploy: overlay {o.name}: {len(docs)} objects valid against Kubernetes {K8S_VERSION}, lint clean")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
