"""The bundle: graphs + ``manifest.json``, everything a runtime needs (docs/design.md §4).

- :mod:`.chat`: the chat template pre-rendered for a runtime without a template engine (``serving.chat``);
- :mod:`.view`: typed read-only views (:class:`Manifest`, :class:`Bundle`, :class:`Engines`); every
  reader of a bundle goes through them;
- :mod:`.verify`: reading and checking (JSON Schema ``manifest.schema.json`` with one-line wording,
  consistency, files and checksums, engine records) and :func:`load_bundle`;
- :mod:`.write`: the one manifest writer (:func:`write_manifest`, always checked before the atomic
  write) and the description of a fresh export (:func:`export_manifest`).
"""
from fastv_export.bundle.chat import ChatForm, RoleForm
from fastv_export.bundle.view import (MANIFEST, Bundle, Engine, Engines, Generation, Manifest, Profile, Serving,
                                      expand_runs)
from fastv_export.bundle.verify import (REQUIRED, SCHEMA_FILE, SCHEMA_VERSION, check_manifest, load_bundle,
                                        manifest_schema, read_manifest)
from fastv_export.bundle.write import config_hash, encode_runs, export_manifest, write_manifest

__all__ = ["MANIFEST", "REQUIRED", "SCHEMA_FILE", "SCHEMA_VERSION", "Bundle", "ChatForm", "Engine", "Engines",
           "Generation", "Manifest", "Profile", "RoleForm", "Serving", "check_manifest", "config_hash", "encode_runs",
           "expand_runs", "export_manifest", "load_bundle", "manifest_schema", "read_manifest", "write_manifest"]
