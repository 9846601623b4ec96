"""Push a Wasm module to an OCI registry with oras (PyPI), in one of the two
forms of the Wasm OCI image spec, and print the manifest digest.

usage: oras_push.py wasm|compat REGISTRY/REPO:TAG MODULE.wasm CA.pem
"""
import io
import json
import os
import sys
import tarfile
import tempfile
import hashlib
import gzip

import oras.provider

form, target, module, ca = sys.argv[1:5]
registry = oras.provider.Registry(tls_verify=ca)
work = tempfile.mkdtemp(prefix="wisp-oras-")
config = os.path.join(work, "config.json")

if form == "wasm":
    # The OCI artifact: config of type module.wasm.config, one wasm layer.
    with open(config, "w") as f:
        json.dump({"type": "envoy_proxy", "abi_version": "v0.2.1", "config": {"root_ids": []}}, f)
    layer = os.path.join(work, "plugin.wasm")
    with open(module, "rb") as src, open(layer, "wb") as dst:
        dst.write(src.read())
    files = [layer + ":application/vnd.module.wasm.content.layer.v1+wasm"]
    manifest_config = config + ":application/vnd.module.wasm.config.v1+json"
    annotations = None
elif form == "compat":
    # The compat image: an ordinary OCI image whose only layer is a tar.gz
    # holding plugin.wasm.
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(module, arcname="plugin.wasm")
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    layer = os.path.join(work, "layer.tar.gz")
    with open(layer, "wb") as f:
        f.write(gzip.compress(raw.getvalue(), mtime=0))
    with open(config, "w") as f:
        json.dump({"architecture": "amd64", "os": "linux",
                   "rootfs": {"type": "layers", "diff_ids": [diff_id]}}, f)
    files = [layer + ":application/vnd.oci.image.layer.v1.tar+gzip"]
    manifest_config = config + ":application/vnd.oci.image.config.v1+json"
    annotations = {"module.wasm.image/variant": "compat"}
else:
    sys.exit("form must be wasm or compat, not %r" % form)

response = registry.push(
    target=target,
    files=files,
    manifest_config=manifest_config,
    manifest_annotations=annotations,
    disable_path_validation=True,
    quiet=True,
)
digest = response.headers.get("Docker-Content-Digest")
if not digest:
    sys.exit("the registry did not return a manifest digest (status %s)" % response.status_code)
print(digest)
