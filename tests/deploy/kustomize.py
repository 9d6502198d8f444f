"""A minimal `kustomize build` for the subset deploy/k8s uses (no kustomize or kubectl binary is
available here, and none ships on PyPI or npm).

Supported kustomization fields, with kustomize's semantics:
- `resources`: files (multi-document YAML) and directories holding a kustomization, in order;
- `patches`: `path` entries holding strategic-merge patches, each document targeting the object of
  the same kind and name (exactly one must exist, as kustomize requires);
- `namespace`: set on every namespaced object;
- `labels` (`pairs`, without `includeSelectors`/`includeTemplates`): added to metadata.labels only;
- `images` (`name`, `newName`, `newTag`): rewrites container images in pod templates.
Any other field raises, so the overlays cannot silently rely on something this renderer ignores.

Strategic merge: maps merge recursively (a null value deletes the key); lists with a Kubernetes
merge key (containers/initContainers/env/volumes by name, volumeMounts by mountPath, container ports
by containerPort, service ports by port) merge item by item, appending new items; every other list
(args, volumeClaimTemplates, topologySpreadConstraints, rules, tls, …) is replaced whole.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class KustomizeError(ValueError):
    pass


def render(directory: Path) -> list[Object]:
    path = directory / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    if (kustomization.get("apiVersion"), kustomization.get("kind")) != (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    ):
        raise KustomizeError(f"{path}: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise KustomizeError(f"{path}: fields this renderer does not implement: {sorted(unsupported)}")

    objects: list[Object] = []
    for resource in kustomization.get("resources", []):
        target = directory / resource
        if target.is_dir():
            objects.extend(render(target))
        elif target.is_file():
            objects.extend(load_documents(target))
        else:
            raise KustomizeError(f"{path}: resource {resource} does not exist")

    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{path}: only `path` patches are implemented, got {sorted(patch)}")
        for document in load_documents(directory / patch["path"]):
            kind, name = document["kind"], document["metadata"]["name"]
            matches = [
                i for i, o in enumerate(objects) if o["kind"] == kind and o["metadata"]["name"] == name
            ]
            if len(matches) != 1:
                raise KustomizeError(
                    f"{path}: patch {patch['path']} targets {kind}/{name}: {len(matches)} found"
                )
            objects[matches[0]] = strategic_merge(objects[matches[0]], document)

    for image in kustomization.get("images", []):
        _set_image(objects, image, path)

    if namespace := kustomization.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace

    for entry in kustomization.get("labels", []):
        if set(entry) - {"pairs"}:
            raise KustomizeError(f"{path}: labels support only `pairs` (metadata labels)")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])

    _check_unique(objects, path)
    return objects


def load_documents(path: Path) -> list[Object]:
    return [copy.deepcopy(d) for d in yaml.safe_load_all(path.read_text()) if d]


def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    if isinstance(original, dict) and isinstance(patch, dict):
        merged = dict(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(original, list) and isinstance(patch, list):
        key = _merge_key(field, original + patch)
        if key is None:
            return copy.deepcopy(patch)
        merged_list = [copy.deepcopy(item) for item in original]
        for item in patch:
            position = next((i for i, old in enumerate(merged_list) if old.get(key) == item.get(key)), None)
            if position is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[position] = strategic_merge(merged_list[position], item)
        return merged_list
    return copy.deepcopy(patch)


def _merge_key(field: str, items: list[Any]) -> str | None:
    if not items or not all(isinstance(item, dict) for item in items):
        return None
    if field == "ports":
        key = "containerPort" if "containerPort" in items[0] else "port"
    else:
        key = MERGE_KEYS.get(field, "")
    return key if key and all(key in item for item in items) else None


def pod_spec(obj: Object) -> Object | None:
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template", {})
    pod: Object | None = template.get("spec")
    return pod


def _set_image(objects: list[Object], image: dict[str, str], path: Path) -> None:
    changed = 0
    for obj in objects:
        pod = pod_spec(obj)
        if pod is None:
            continue
        for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
                changed += 1
    if changed == 0:
        raise KustomizeError(f"{path}: image {image['name']} is used by no container")


def _check_unique(objects: list[Object], path: Path) -> None:
    seen: set[tuple[str, str, str | None]] = set()
    for obj in objects:
        identity = (obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace"))
        if identity in seen:
            raise KustomizeError(f"{path}: {identity} is defined twice")
        seen.add(identity)
