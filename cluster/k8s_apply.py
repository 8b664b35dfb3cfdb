"""``diffdis submit k8s --apply``: create the rendered objects with the ``kubernetes`` client.

Optional dependency (``pip install 'diffdis[k8s-apply]'``, kubernetes < 37: version 37 requires
python-dateutil>=3 while botocore (S3 checkpoints) pins <3).
Core kinds go through ``kubernetes.utils.create_from_dict``; custom resources through
``CustomObjectsApi`` with the plural of each kind below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster import ClusterError

PLURALS = {"TrainJob": "trainjobs", "TrainingRuntime": "trainingruntimes", "PyTorchJob": "pytorchjobs",
           "RayJob": "rayjobs"}


def kubeconfig_present() -> bool:
    import os  # noqa: PLC0415

    path = os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config"))
    return any(Path(p).is_file() for p in path.split(os.pathsep)) or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def apply(manifests: list[dict[str, Any]]) -> list[str]:
    """Create every object; returns "Kind/name" for each. Stops at the first API error, naming it."""
    if not kubeconfig_present():
        raise ClusterError("--apply: no kubeconfig (KUBECONFIG or ~/.kube/config) and not inside a cluster; "
                           "render with --dry-run and apply the file with kubectl instead")
    try:
        from kubernetes import client, config, utils  # noqa: PLC0415
    except ImportError:
        raise ClusterError("--apply needs the kubernetes client: pip install 'diffdis[k8s-apply]' "
                           "(or apply the rendered file with kubectl apply -f)") from None
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.ApiClient()
    created = []
    for manifest in manifests:
        kind, meta = manifest["kind"], manifest["metadata"]
        try:
            if kind in PLURALS:
                group, version = manifest["apiVersion"].split("/")
                client.CustomObjectsApi(api).create_namespaced_custom_object(
                    group, version, meta.get("namespace", "default"), PLURALS[kind], manifest)
            else:
                utils.create_from_dict(api, manifest, namespace=meta.get("namespace", "default"))
        except Exception as error:  # noqa: BLE001 - the API's errors come in several types; all are reported
            raise ClusterError(f"creating {kind} {meta['name']!r} failed: {error}") from None
        created.append(f"{kind}/{meta['name']}")
    return created
