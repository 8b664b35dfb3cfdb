"""Offline validation of rendered manifests, before anything reaches a cluster.

Core and apps kinds (Deployment, Service, ...) go through ``kubernetes-validate`` in strict mode
(unknown fields are errors) against the bundled schema of one Kubernetes version. Custom resources
(TrainJob, TrainingRuntime, PyTorchJob, RayJob) go through the vendored CRD schema subsets in
``cluster/schemas/`` (their README names the sources); a value the CRD embeds from the core API
(a pod template, a Job spec, ...) is marked ``x-diffdis-core`` there and checked with
kubernetes-validate's own schema of that type. Every error names the object and the field path.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

K8S_VERSION = "1.37.0"
SCHEMA_DIR = Path(__file__).parent / "schemas"
CORE_MARK = "x-diffdis-core"


class ManifestError(ValueError):
    """A rendered manifest does not match its schema; the message names the object and field."""


# core type → (wrap the value into a whole object kubernetes-validate knows, the path of the value in it)
_CONTAINER = {"name": "c", "image": "i"}
CORE_WRAPPERS = {
    "ObjectMeta": (lambda v: {"apiVersion": "v1", "kind": "ConfigMap", "metadata": v}, ("metadata",)),
    "PodTemplateSpec": (lambda v: {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": v},
                        ("template",)),
    "JobSpec": (lambda v: {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, "spec": v}, ("spec",)),
    "EnvVar": (lambda v: _pod_with_container({**_CONTAINER, "env": [v]}), ("template", "spec", "containers", 0, "env", 0)),
    "ResourceRequirements": (lambda v: _pod_with_container({**_CONTAINER, "resources": v}),
                             ("template", "spec", "containers", 0, "resources")),
}


def _pod_with_container(container: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
            "template": {"spec": {"containers": [container]}}}


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) → JSON schema, from cluster/schemas/*.yaml."""
    schemas = {}
    for path in sorted(SCHEMA_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        schemas[(doc["apiVersion"], doc["kind"])] = doc["schema"]
    return schemas


def _describe(manifest: dict) -> str:
    name = (manifest.get("metadata") or {}).get("name", "?") if isinstance(manifest, dict) else "?"
    return f"{manifest.get('kind', '?')} {name!r}" if isinstance(manifest, dict) else "manifest"


def _dotted(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _first_error(validator: jsonschema.protocols.Validator, instance: Any) -> jsonschema.ValidationError | None:
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    return errors[0] if errors else None


def _core_values(schema: dict, value: Any, path: tuple) -> Iterator[tuple[str, tuple, Any]]:
    """Walk ``value`` along ``schema``; yield (core type, path, value) for each ``x-diffdis-core`` node."""
    if CORE_MARK in schema:
        yield schema[CORE_MARK], path, value
        return
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub:
                yield from _core_values(sub, item, (*path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _core_values(schema["items"], item, (*path, i))


def _validate_core(kind: str, value: Any, path: tuple, where: str) -> None:
    import kubernetes_validate  # noqa: PLC0415 - only when validating

    wrap, inner = CORE_WRAPPERS[kind]
    try:
        kubernetes_validate.validate(wrap(value), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        tail = tuple(error.path)[len(inner):] if tuple(error.path)[:len(inner)] == inner else tuple(error.path)
        raise ManifestError(f"{where}: {_dotted((*path, *tail))}: {error.message}") from None


def validate_manifest(manifest: dict) -> None:
    """Raise :class:`ManifestError` naming the object and field at fault; return None when valid."""
    where = _describe(manifest)
    if not isinstance(manifest, dict) or "apiVersion" not in manifest or "kind" not in manifest:
        raise ManifestError(f"{where}: apiVersion and kind are required")
    key = (manifest["apiVersion"], manifest["kind"])
    schema = crd_schemas().get(key)
    if schema is None:
        import kubernetes_validate  # noqa: PLC0415

        try:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            raise ManifestError(f"{where}: no schema for {key[0]} {key[1]} (Kubernetes {K8S_VERSION} or "
                                f"cluster/schemas/)") from None
        except kubernetes_validate.ValidationError as error:
            raise ManifestError(f"{where}: {_dotted(error.path)}: {error.message}") from None
        return
    error = _first_error(jsonschema.Draft7Validator(schema), manifest)
    if error is not None:
        raise ManifestError(f"{where}: {_dotted(error.absolute_path)}: {error.message}")
    for kind, path, value in _core_values(schema, manifest, ()):
        _validate_core(kind, value, path, where)


def validate_manifests(manifests: list[dict]) -> None:
    for manifest in manifests:
        validate_manifest(manifest)
