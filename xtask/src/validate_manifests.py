"""Validates every manifest under DIR offline, as `cargo xtask test` runs it.

Built-in kinds go through kubernetes-validate in strict mode (unknown fields
are errors) against the newest Kubernetes schemas it ships. kubernetes-validate
cannot validate custom resources, so objects of a kind that a
CustomResourceDefinition under DIR defines are checked with jsonschema against
that CRD's openAPIV3Schema, closed as the API server's strict field validation
does (an unknown field is an error unless the schema preserves unknown fields).
An object of any other kind is an error.

usage: validate_manifests.py DIR
"""
import glob
import os
import sys

import jsonschema
import yaml
import kubernetes_validate.utils as kv

root = sys.argv[1]
files = sorted(
    glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)
    + glob.glob(os.path.join(root, "**", "*.yml"), recursive=True)
)
errors = 0
docs = []
for path in files:
    try:
        with open(path) as f:
            docs += [(path, d) for d in yaml.safe_load_all(f) if d]
    except yaml.YAMLError as e:
        print("ERROR %s: not YAML: %s" % (path, e))
        errors += 1

def closed(schema, root=False):
    """The schema with unknown fields refused wherever Kubernetes would prune
    them; not at the root, where apiVersion, kind and metadata are implied."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if (not root and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


crds = {}
for path, doc in docs:
    if doc.get("kind") != "CustomResourceDefinition":
        continue
    spec = doc.get("spec") or {}
    kind = (spec.get("names") or {}).get("kind")
    for version in spec.get("versions") or []:
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if schema:
            crds[("%s/%s" % (spec.get("group"), version.get("name")), kind)] = closed(schema, root=True)

k8s = kv.latest_version()
builtin = custom = 0
for path, doc in docs:
    name = "%s/%s" % (doc.get("kind"), (doc.get("metadata") or {}).get("name"))
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crds:
        found = sorted(jsonschema.Draft7Validator(crds[key]).iter_errors(doc), key=lambda e: list(e.path))
        for e in found:
            print("ERROR %s: %s: %s: %s" % (path, name, ".".join(map(str, e.path)) or "(root)", e.message))
        errors += len(found)
        custom += 1
        continue
    try:
        kv.validate(doc, k8s, strict=True)
        builtin += 1
    except kv.ValidationError as e:
        print("ERROR %s: %s: %s: %s" % (path, name, ".".join(map(str, e.path)) or "(root)", e.message))
        errors += 1
    except kv.SchemaNotFoundError:
        print("ERROR %s: %s: %s %s is neither a built-in kind nor defined by a CRD under %s"
              % (path, name, key[0], key[1], root))
        errors += 1

print("manifests: %d built-in object(s) checked against Kubernetes %s (strict), %d custom resource(s) "
      "against their CRD schema: %d error(s)" % (builtin, k8s, custom, errors))
sys.exit(1 if errors else 0)
