"""Manifest files: parsing (multi-document, List, errors with lines) and ManifestSet's rescans."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.model import NamespacedName
from proxy.sources.manifests import ManifestError, ManifestSet, parse
from tests.unit.factories import make_service, make_slice

SVC = ("Service", NamespacedName("default", "web"))
SLICE = ("EndpointSlice", NamespacedName("default", "web-abc12"))


def dump(*docs: Any) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


# -- parse -----------------------------------------------------------------------------------------

def test_multi_document_file() -> None:
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {}}
    text = dump(make_service(), None, config_map, make_slice())
    objects = parse(Path("web.yaml"), text)
    assert set(objects) == {SVC, SLICE}  # empty documents and other kinds are skipped
    assert objects[SVC]["spec"]["clusterIP"] == "10.96.0.10"


def test_namespace_defaults_to_default() -> None:
    svc = make_service(ns="shop")
    svc["metadata"].pop("namespace")
    assert set(parse(Path("web.yaml"), dump(svc))) == {SVC}


@pytest.mark.parametrize("kind", ["List", "ServiceList"])
def test_list_kind_is_flattened(kind: str) -> None:
    doc = {"apiVersion": "v1", "kind": kind, "items": [make_service(), make_slice(ns="shop")]}
    objects = parse(Path("all.yaml"), dump(doc))
    assert set(objects) == {SVC, ("EndpointSlice", NamespacedName("shop", "web-abc12"))}


def test_node_is_cluster_scoped() -> None:
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "namespace": "ignored",
                                                            "labels": {"topology.kubernetes.io/zone": "z1"}}}
    assert set(parse(Path("node.yaml"), dump(node))) == {("Node", NamespacedName("", "node-a"))}


def test_json_file() -> None:
    assert set(parse(Path("web.json"), json.dumps(make_service()))) == {SVC}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("kind: Service\nmetadata:\n  name: web\n  labels: [a\nspec: {}\n", 5),
        ("kind: Service\n---\nkind: EndpointSlice\nmetadata: : x\n", 4),
        ("kind: Service\nmetadata:\n\tname: web\n", 3),
    ],
    ids=["unclosed-flow", "second-document", "tab"],
)
def test_yaml_syntax_error_names_file_and_line(text: str, line: int) -> None:
    with pytest.raises(ManifestError) as info:
        parse(Path("/etc/svcproxy/web.yaml"), text)
    assert str(info.value).startswith(f"/etc/svcproxy/web.yaml:{line}: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "document 1: expected an object"),
        (dump(make_service(), {"kind": "List", "items": {"a": 1}}), "document 2: List items must be a list"),
        ("apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n", "document 1: Service has no metadata.name"),
        ("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n", "document 1: EndpointSlice has no metadata.name"),
        ("apiVersion: v1\nmetadata: {name: web}\n", "document 1: no kind"),
        (dump(make_service(), {"metadata": {"name": "cut"}}), "document 2: no apiVersion"),
    ],
    ids=["not-a-mapping", "items-not-list", "no-name", "no-metadata", "no-kind", "cut-before-kind"],
)
def test_unusable_document_names_file_and_document(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=f"^web.yaml: {message}"):
        parse(Path("web.yaml"), text)


# -- ManifestSet.scan ------------------------------------------------------------------------------

class Files:
    """Writes files with strictly increasing mtimes, so every edit is seen even on coarse clocks."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mtime = 1_700_000_000

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.mtime += 10
        os.utime(path, (self.mtime, self.mtime))
        return path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def test_scan_add_modify_break_fix_delete(files: Files, caplog: pytest.LogCaptureFixture) -> None:
    ms = ManifestSet(files.root)
    assert ms.scan() == ({}, [])

    path = files.write("web.yaml", dump(make_service(), make_slice()))
    changed, deleted = ms.scan()
    assert (set(changed), deleted) == ({SVC, SLICE}, [])
    assert ms.scan() == ({}, [])  # nothing new

    files.write("web.yaml", dump(make_service(clusterIP="10.96.0.99"), make_slice()))
    changed, deleted = ms.scan()
    assert (set(changed), deleted) == ({SVC}, [])
    assert changed[SVC]["spec"]["clusterIP"] == "10.96.0.99"

    with caplog.at_level(logging.ERROR, logger="proxy.sources.manifests"):
        files.write("web.yaml", "kind: Service\nmetadata: [\n")  # a half-saved edit
        assert ms.scan() == ({}, [])
    assert set(ms.objects) == {SVC, SLICE}  # the last good objects keep serving
    assert any(str(path) in r.getMessage() for r in caplog.records)

    files.write("web.yaml", dump(make_slice()))
    assert ms.scan() == ({}, [SVC])

    path.unlink()
    assert ms.scan() == ({}, [SLICE])
    assert ms.objects == {}


def test_new_broken_file_adds_nothing(files: Files) -> None:
    ms = ManifestSet(files.root)
    files.write("web.yaml", "kind: [\n")
    assert ms.scan() == ({}, [])


def test_files_in_subdirectories_are_read(files: Files) -> None:
    files.write("a/web.yaml", dump(make_service()))
    files.write("b/c/slice.yml", dump(make_slice()))
    files.write("d/more.json", json.dumps(make_service(name="api")))
    changed, _ = ManifestSet(files.root).scan()
    assert set(changed) == {SVC, SLICE, ("Service", NamespacedName("default", "api"))}


def test_hidden_and_foreign_files_are_ignored(files: Files) -> None:
    # A mounted ConfigMap has ..data and ..2024_05_01 entries next to its keys.
    files.write(".web.yaml", dump(make_service(name="hidden-file")))
    files.write(".git/web.yaml", dump(make_service(name="hidden-dir")))
    files.write("..2024_05_01/web.yaml", dump(make_service(name="configmap-data")))
    files.write("web.yaml.swp", dump(make_service(name="swap")))
    files.write("README.md", "# not a manifest\n")
    files.write("web.yaml", dump(make_service()))
    changed, _ = ManifestSet(files.root).scan()
    assert set(changed) == {SVC}


def test_single_file_root(files: Files) -> None:
    path = files.write("web.yaml", dump(make_service()))
    files.write("other.yaml", dump(make_slice()))
    changed, _ = ManifestSet(path).scan()
    assert set(changed) == {SVC}


def test_missing_root_is_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="proxy.sources.manifests"):
        assert ManifestSet(tmp_path / "nope").scan() == ({}, [])
    assert any("does not exist" in r.getMessage() for r in caplog.records)


def test_object_moved_between_files_is_not_deleted(files: Files) -> None:
    a = files.write("a.yaml", dump(make_service()))
    ms = ManifestSet(files.root)
    ms.scan()
    files.write("b.yaml", dump(make_service()))
    a.unlink()
    assert ms.scan() == ({}, [])
    assert set(ms.objects) == {SVC}


def test_a_file_cut_short_keeps_its_last_good_objects(files: Files, caplog: pytest.LogCaptureFixture) -> None:
    """`head -n 30 full.yaml > web.yaml`: the slice is cut before its kind."""
    ms = ManifestSet(files.root)
    full = dump(make_service(), make_slice())
    files.write("web.yaml", full)
    assert set(ms.scan()[0]) == {SVC, SLICE}
    cut = full[:full.index("kind: EndpointSlice")]
    assert cut.rstrip().endswith("apiVersion: discovery.k8s.io/v1")
    with caplog.at_level(logging.ERROR, logger="proxy.sources.manifests"):
        files.write("web.yaml", cut)
        assert ms.scan() == ({}, [])
    assert "document 2: no kind" in caplog.text
    assert set(ms.objects) == {SVC, SLICE}
    files.write("web.yaml", full)  # saved whole again: nothing changed
    assert ms.scan() == ({}, [])


def test_an_emptied_file_keeps_its_objects_until_deleted(files: Files, caplog: pytest.LogCaptureFixture) -> None:
    ms = ManifestSet(files.root)
    path = files.write("web.yaml", dump(make_service(), make_slice()))
    ms.scan()
    with caplog.at_level(logging.WARNING, logger="proxy.sources.manifests"):
        files.write("web.yaml", "")
        assert ms.scan() == ({}, [])
    assert "is empty now: keeping its 2 objects" in caplog.text
    path.unlink()
    assert ms.scan() == ({}, [SVC, SLICE])


def test_a_file_that_is_not_utf8_is_named(files: Files, caplog: pytest.LogCaptureFixture) -> None:
    ms = ManifestSet(files.root)
    path = files.root / "bad.yaml"
    path.write_bytes(b"apiVersion: v1\nkind: Service\nmetadata: {name: \xff}\n")
    with caplog.at_level(logging.ERROR, logger="proxy.sources.manifests"):
        assert ms.scan() == ({}, [])
    assert f"cannot load {path}: not UTF-8" in caplog.text


def test_an_alias_bomb_is_refused_quickly() -> None:
    import time

    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))  # 10^9 values once expanded, in about 600 bytes
    started = time.monotonic()
    with pytest.raises(ManifestError, match=r"^bomb.yaml: expands to more than 2,000,000 values"):
        parse(Path("bomb.yaml"), bomb)
    assert time.monotonic() - started < 5  # bounded: never an expansion


def test_anchors_used_sensibly_still_work() -> None:
    text = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web}
  spec: &spec {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, protocol: TCP}]}
- apiVersion: v1
  kind: Service
  metadata: {name: api}
  spec: *spec
"""
    objects = parse(Path("a.yaml"), text)
    assert [key for _, key in objects] == [NamespacedName("default", "web"), NamespacedName("default", "api")]


def test_an_oversized_file_is_refused_without_reading_it(files: Files, caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.sources import manifests

    ms = ManifestSet(files.root)
    files.write("web.yaml", dump(make_service(), make_slice()))
    ms.scan()
    monkeypatch.setattr(manifests, "MAX_FILE_BYTES", 1000)
    with caplog.at_level(logging.ERROR, logger="proxy.sources.manifests"):
        files.write("web.yaml", dump(make_service(), make_slice()) + "# " + "x" * 2000 + "\n")
        assert ms.scan() == ({}, [])
    assert "bytes is more than the 1,000 a manifest file may have; refused" in caplog.text
    assert set(ms.objects) == {SVC, SLICE}  # the last good objects keep serving


def test_a_directory_that_cannot_be_listed_keeps_every_object(files: Files, caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors, os.walk cannot list the directory: that is not "every file deleted"."""
    import errno

    from proxy.sources import manifests

    ms = ManifestSet(files.root)
    files.write("web.yaml", dump(make_service(), make_slice()))
    ms.scan()
    real_walk = os.walk

    def failing_walk(top: Any, onerror: Any = None, **kwargs: Any) -> Any:
        onerror(OSError(errno.EMFILE, "Too many open files"))
        return iter(())

    monkeypatch.setattr(manifests.os, "walk", failing_walk)
    with caplog.at_level(logging.ERROR, logger="proxy.sources.manifests"):
        assert ms.scan() == ({}, [])
        assert ms.scan() == ({}, [])
    assert caplog.text.count("cannot list") == 1 and set(ms.objects) == {SVC, SLICE}
    monkeypatch.setattr(manifests.os, "walk", real_walk)
    assert ms.scan() == ({}, [])  # listed again: nothing changed
