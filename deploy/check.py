#!/usr/bin/env python3
"""Renders every overlay under deploy/k8s/overlays with `kubectl kustomize`, validates each object
against the Kubernetes OpenAPI schemas offline (kubernetes-validate, strict: unknown fields are
errors), scans the renders with checkov (offline, pinned in scripts/setup.sh), and lints what an
operator expects of bt's manifests. Prints one line per overlay; exits 1 with every problem listed.

    python deploy/check.py [--render-dir DIR]    # DIR: also write each rendered overlay there
"""
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import yaml

K8S_VERSION = "1.31.0"
ROOT = Path(__file__).resolve().parent / "k8s"
WORKLOADS = {"StatefulSet", "Deployment", "DaemonSet"}
# The coordinator's drain deadline after SIGTERM (coordinator/src/server.rs).
DRAIN_SECONDS = 5
# Custom resources of the optional components (Prometheus Operator, cert-manager). Their schemas
# are CRDs, which kubernetes-validate does not carry: they are not schema-validated here (every
# built-in object is); the lint below checks what bt relies on in them.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
}
# Secrets the operator creates out of band (k8s/SECURITY.md); any other Secret a pod mounts must
# come from a cert-manager Certificate in the same render.
OPERATOR_SECRETS = {"bt-tls", "bt-auth"}
# The rank-0 TCPStore ports (the daemons' --port-range).
STORE_PORTS = "29500-29600"

# checkov checks skipped for every resource, each for its reason. Checks skipped for one resource
# only are annotations on that resource (`checkov.io/skipN: CKV_...=reason`), next to what they
# excuse: base/worker.yaml.
CHECKOV_SKIPS = {
    # "Image Pull Policy should be Always": the images carry immutable version tags (no
    # `latest` in the gpu overlays, linted below), so IfNotPresent pulls a tag once per node;
    # Always would make every restart of a daemon, with its trainers, wait on the registry.
    "CKV_K8S_15",
    # "Image should use digest": the tag is set per overlay; pin a digest at release time with
    # kustomize (`images: - name: ghcr.io/bt-project/bt digest: sha256:...`), which this
    # repository cannot know before the image is built.
    "CKV_K8S_43",
}
# Pod Security "baseline": the capabilities a container may add.
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                 "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


def render(overlay: Path) -> tuple:
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


def env_field(container, name):
    """The downward-API field an env variable comes from, or None."""
    for e in container.get("env", []):
        if e["name"] == name:
            return e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    return None


def selects(selector: dict, labels: dict) -> bool:
    """Whether a matchLabels-only selector selects `labels` (bt's selectors use matchLabels)."""
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def baseline_problems(name: str, pod: dict) -> list:
    """What Pod Security "baseline" refuses in a pod spec."""
    out = []
    for f in ["hostNetwork", "hostPID", "hostIPC"]:
        if pod.get(f):
            out.append(f"{name}: {f} in a Pod Security baseline namespace")
    for v in pod.get("volumes", []):
        if "hostPath" in v:
            out.append(f"{name}: hostPath volume {v['name']} in a Pod Security baseline namespace")
    seccomp = pod.get("securityContext", {}).get("seccompProfile", {}).get("type")
    if seccomp == "Unconfined":
        out.append(f"{name}: seccomp Unconfined in a Pod Security baseline namespace")
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        cn = f"{name}[{c['name']}]"
        if sc.get("privileged"):
            out.append(f"{cn}: privileged in a Pod Security baseline namespace")
        extra = set(sc.get("capabilities", {}).get("add", [])) - BASELINE_CAPS
        if extra:
            out.append(f"{cn}: adds capabilities {sorted(extra)} beyond baseline")
        if any("hostPort" in p for p in c.get("ports", [])):
            out.append(f"{cn}: hostPort in a Pod Security baseline namespace")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{cn}: procMount {sc['procMount']} in a Pod Security baseline namespace")
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            out.append(f"{cn}: seccomp Unconfined in a Pod Security baseline namespace")
    return out


def restricted_problems(name: str, pod: dict) -> list:
    """What Pod Security "restricted" refuses beyond baseline."""
    out = []
    allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
               "persistentVolumeClaim", "projected", "secret"}
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= allowed:
            out.append(f"{name}: volume {v['name']} ({', '.join(sorted(kinds))}) is outside restricted")
    psc = pod.get("securityContext", {})
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        cn = f"{name}[{c['name']}]"
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{cn}: not runAsNonRoot (restricted)")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{cn}: runAsUser 0 (restricted)")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{cn}: seccomp profile {seccomp} (restricted wants RuntimeDefault)")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{cn}: allowPrivilegeEscalation not false (restricted)")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{cn}: capabilities not restricted (drop ALL, add at most NET_BIND_SERVICE)")
    return out


def lint(overlay: str, docs: list) -> list:
    problems = []
    kinds = {d["kind"] for d in docs}
    for need in ["StatefulSet", "DaemonSet", "Service", "PodDisruptionBudget", "NetworkPolicy",
                 "ServiceAccount", "PersistentVolumeClaim", "Namespace", "PriorityClass"]:
        if need not in kinds:
            problems.append(f"no {need}")
    by_kind = lambda k: [d for d in docs if d["kind"] == k]  # noqa: E731
    namespaces = by_kind("Namespace")
    ns_labels = namespaces[0]["metadata"].get("labels", {}) if namespaces else {}
    enforce = ns_labels.get("pod-security.kubernetes.io/enforce")
    priority_classes = {d["metadata"]["name"] for d in by_kind("PriorityClass")}
    policies = by_kind("NetworkPolicy")
    certificates = by_kind("Certificate")
    cert_secrets = {c["spec"]["secretName"] for c in certificates}
    mounted_secrets = set()
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        labels = d["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/part-of") != "bt":
            problems.append(f"{name}: no app.kubernetes.io/part-of=bt label")
        if d["kind"] == "Secret":
            problems.append(f"{name}: a Secret is committed; create secrets out of band")
        if d["kind"] not in WORKLOADS:
            continue
        tmeta = d["spec"]["template"]["metadata"]
        pod = d["spec"]["template"]["spec"]
        pod_labels = tmeta.get("labels", {})
        if "app.kubernetes.io/name" not in pod_labels:
            problems.append(f"{name}: pods carry no app.kubernetes.io/name label")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not set")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a service account token it does not need")
        if not pod.get("serviceAccountName"):
            problems.append(f"{name}: runs as the default service account")
        # bt ignores the kubelet's service links (common/src/config.rs) but wants none.
        if pod.get("enableServiceLinks") is not False:
            problems.append(f"{name}: enableServiceLinks is not false")
        pc = pod.get("priorityClassName")
        if not pc or pc not in priority_classes:
            problems.append(f"{name}: priorityClassName {pc!r} is not a PriorityClass of the render")
        if enforce in ("baseline", "restricted"):
            problems += baseline_problems(name, pod)
        # A namespace that warns or audits against "restricted" should hear nothing from bt.
        if "restricted" in (enforce, ns_labels.get("pod-security.kubernetes.io/warn"),
                            ns_labels.get("pod-security.kubernetes.io/audit")):
            problems += restricted_problems(name, pod)
        elif pod.get("hostNetwork") and enforce != "privileged":
            problems.append(f"{name}: host networking, but the namespace does not enforce "
                            "pod-security.kubernetes.io/enforce=privileged")
        for v in pod.get("volumes", []):
            if "secret" in v:
                mounted_secrets.add(v["secret"]["secretName"])
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for c in pod["containers"]:
            cn = f"{name}[{c['name']}]"
            image = c.get("image", "")
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            if not tag:
                problems.append(f"{cn}: image {image!r} has no tag")
            if overlay.startswith("gpu") and tag == "latest":
                problems.append(f"{cn}: image tag 'latest' in a gpu overlay")
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
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
                if arg_value(args, "--port-range") != STORE_PORTS:
                    problems.append(f"{cn}: --port-range is not {STORE_PORTS} (the policies and docs name it)")
                host = env_field(c, "BT_WORKER_HOST")
                if pod.get("hostNetwork") is True:
                    if host != "status.hostIP":
                        problems.append(f"{cn}: host networking, but BT_WORKER_HOST is not status.hostIP")
                    if pod.get("dnsPolicy") != "ClusterFirstWithHostNet":
                        problems.append(f"{cn}: host networking without dnsPolicy ClusterFirstWithHostNet")
                elif host != "status.podIP":
                    problems.append(f"{cn}: on the pod network, but BT_WORKER_HOST is not status.podIP")
                if overlay.startswith("gpu") and "nvidia.com/gpu" not in lim:
                    problems.append(f"{cn}: no nvidia.com/gpu limit")
            else:
                for p in ["readinessProbe", "livenessProbe"]:
                    if p not in c:
                        problems.append(f"{cn}: no {p}")
                if grace <= DRAIN_SECONDS:
                    problems.append(f"{cn}: terminationGracePeriodSeconds {grace} is not longer than the drain deadline")
                # Guaranteed QoS: the coordinator is the last pod evicted under node pressure.
                for r in ["cpu", "memory"]:
                    if r not in lim or str(req.get(r)) != str(lim[r]):
                        problems.append(f"{cn}: {r} request != limit (not Guaranteed QoS)")
        if d["kind"] == "DaemonSet":
            ann = tmeta.get("annotations", {})
            for k, v in [("karpenter.sh/do-not-disrupt", "true"),
                         ("cluster-autoscaler.kubernetes.io/safe-to-evict", "false")]:
                if ann.get(k) != v:
                    problems.append(f"{name}: pods lack the annotation {k}: \"{v}\"")
            problems += worker_network(name, pod, pod_labels, policies)
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        if "/checkpoints" not in mounts:
            problems.append(f"{name}: the checkpoint volume is not mounted at /checkpoints")
    for s in sorted(mounted_secrets - OPERATOR_SECRETS - cert_secrets):
        problems.append(f"a pod mounts Secret {s}, which neither the operator nor a Certificate makes")
    problems += custom_resources(docs)
    problems += persistent_volumes(docs)
    return problems


def worker_network(name, pod, worker_labels, policies) -> list:
    """The daemons' network confinement: on the pod network, a policy selects the daemons and
    admits only daemon pods (the store port range among them), and the coordinator's admits
    them on the API port; on host networking, the coordinator's names an address block."""
    out = []
    coord = [p for p in policies if p["metadata"]["name"] == "bt-coordinator"]
    if not coord:
        return [f"{name}: no bt-coordinator NetworkPolicy"]
    api_from = [f for r in coord[0]["spec"].get("ingress", [])
                if any(p.get("port") == 7070 for p in r.get("ports", []))
                for f in r.get("from", [])]
    if pod.get("hostNetwork") is True:
        blocks = [f["ipBlock"]["cidr"] for f in api_from if "ipBlock" in f]
        if not blocks:
            out.append(f"{name}: host networking, but no ipBlock admits the nodes to the API port")
        for b in blocks:
            try:
                if ipaddress.ip_network(b).prefixlen == 0:
                    out.append(f"{name}: ipBlock {b} admits every address")
            except ValueError as e:
                out.append(f"{name}: ipBlock {b}: {e}")
        return out
    if not any("podSelector" in f and "namespaceSelector" not in f
               and selects(f["podSelector"], worker_labels) for f in api_from):
        out.append(f"{name}: the coordinator's NetworkPolicy does not admit daemon pods to port 7070")
    mine = [p for p in policies if selects(p["spec"]["podSelector"], worker_labels)
            and "Ingress" in p["spec"].get("policyTypes", [])]
    if not mine:
        out.append(f"{name}: on the pod network, but no NetworkPolicy isolates the daemon pods")
    for p in mine:
        for r in p["spec"].get("ingress", []):
            for f in r.get("from", [{}]) or [{}]:
                if set(f) != {"podSelector"} or not selects(f["podSelector"], worker_labels):
                    out.append(f"NetworkPolicy/{p['metadata']['name']}: admits {f or 'everyone'} "
                               f"to the daemons (ports {STORE_PORTS} must be reachable from daemon pods only)")
    return out


def custom_resources(docs) -> list:
    """What bt relies on in the components' custom resources (not schema-validated)."""
    out = []
    services = [d for d in docs if d["kind"] == "Service"]
    issuers = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Issuer"}
    cert_secrets = {d["spec"]["secretName"] for d in docs if d["kind"] == "Certificate"}
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "ServiceMonitor":
            sel = d["spec"].get("selector", {})
            hits = [s for s in services if selects(sel, s["metadata"].get("labels", {}))]
            if len(hits) != 1:
                out.append(f"{name}: selects {len(hits)} Services, not the metrics Service alone")
            for e in d["spec"].get("endpoints", []):
                for s in hits:
                    if e.get("port") not in {p.get("name") for p in s["spec"]["ports"]}:
                        out.append(f"{name}: Service/{s['metadata']['name']} has no port {e.get('port')!r}")
        elif d["kind"] == "Certificate":
            ref = d["spec"].get("issuerRef", {})
            if ref.get("kind", "Issuer") != "Issuer" or ref.get("name") not in issuers:
                out.append(f"{name}: issuer {ref} is not an Issuer of the render")
            if "usages" in d["spec"] and not d["spec"].get("isCA"):
                if not {"server auth", "client auth"} & set(d["spec"]["usages"]):
                    out.append(f"{name}: neither server nor client auth usage")
        elif d["kind"] == "Issuer":
            ca = d["spec"].get("ca")
            if ca and ca.get("secretName") not in cert_secrets:
                out.append(f"{name}: CA Secret {ca.get('secretName')} is made by no Certificate")
    return out


def persistent_volumes(docs) -> list:
    """A PersistentVolume of the render binds to a claim of the render, and that claim to it."""
    out = []
    ns = next((d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"), None)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for pv in (d for d in docs if d["kind"] == "PersistentVolume"):
        ref = pv["spec"].get("claimRef", {})
        name = f"PersistentVolume/{pv['metadata']['name']}"
        claim = claims.get(ref.get("name"))
        if ref.get("namespace") != ns or claim is None:
            out.append(f"{name}: claimRef {ref} is not a claim of namespace {ns}")
        elif claim["spec"].get("volumeName") != pv["metadata"]["name"]:
            out.append(f"{name}: claim {ref['name']} does not name this volume")
    return out


def checkov(render_dir: Path) -> dict:
    """checkov's failed checks per rendered file (`<overlay>.yaml`), offline."""
    exe = Path(sys.executable).parent / "checkov"
    # Offline: no look-up of a newer checkov on PyPI, no mapping of checks from the vendor's
    # platform (BC_SKIP_MAPPING, as --skip-download).
    env = dict(os.environ, CKV_SKIP_PACKAGE_UPDATE_CHECK="TRUE", BC_SKIP_MAPPING="TRUE")
    r = subprocess.run(
        [str(exe), "--directory", str(render_dir), "--framework", "kubernetes",
         # Offline: no guidelines or severities from the vendor's platform.
         "--skip-download", "--quiet", "--compact", "--output", "json",
         "--skip-check", ",".join(sorted(CHECKOV_SKIPS))],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if r.returncode not in (0, 1):
        raise RuntimeError(f"checkov failed ({r.returncode}): {r.stderr[-2000:]}")
    data = json.loads(r.stdout) if r.stdout.strip() else []
    failed = {}
    for report in data if isinstance(data, list) else [data]:
        for c in report.get("results", {}).get("failed_checks", []):
            f = Path(c["file_path"]).name
            failed.setdefault(f, []).append(f"checkov {c['check_id']} ({c['check_name']}): {c['resource']}")
    return failed


def main() -> int:
    render_dir = None
    if len(sys.argv) == 3 and sys.argv[1] == "--render-dir":
        render_dir = Path(sys.argv[2])
        render_dir.mkdir(parents=True, exist_ok=True)
    overlays = sorted(p for p in (ROOT / "overlays").iterdir() if p.is_dir())
    failed = False
    with tempfile.TemporaryDirectory(prefix="bt-deploy-check-") as tmp:
        scan_dir = Path(tmp)
        results = []
        for o in overlays:
            text, docs = render(o)
            (scan_dir / f"{o.name}.yaml").write_text(text)
            if render_dir:
                (render_dir / f"{o.name}.yaml").write_text(text)
            problems, custom = [], 0
            for d in docs:
                if (d.get("apiVersion"), d["kind"]) in CUSTOM_KINDS:
                    custom += 1
                    continue
                try:
                    kubernetes_validate.validate(d, K8S_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    problems.append(f"{d['kind']}/{d['metadata']['name']}: {e.message} at {'/'.join(map(str, e.path))}")
                except Exception as e:  # an unknown kind or version
                    problems.append(f"{d['kind']}/{d['metadata']['name']}: {e}")
            problems += lint(o.name, docs)
            results.append((o.name, docs, custom, problems))
        scanned = checkov(scan_dir)
    for name, docs, custom, problems in results:
        problems += scanned.get(f"{name}.yaml", [])
        if problems:
            failed = True
            print(f"deploy: overlay {name}: {len(problems)} problems")
            for p in problems:
                print(f"  - {p}")
        else:
            extra = f" ({custom} custom resources not schema-checked)" if custom else ""
            print(f"deploy: overlay {name}: {len(docs)} objects valid against Kubernetes "
                  f"{K8S_VERSION}{extra}, checkov and lint clean")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
