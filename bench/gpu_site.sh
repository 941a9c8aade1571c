#!/usr/bin/env bash
# Sourced by the GPU scripts (bench/multihost_gpu.sh, bench/proxy_gpu.sh): when pyccl is not
# installed (GPU machines have no cffi), lay the package out from the tree without the C core
# and put it on PYTHONPATH. Run from the repository root.
if ! python3 -c "import pyccl.communicator" 2>/dev/null; then
  SITE=${PYCCL_SITE:-/tmp/pyccl-site}
  rm -rf "$SITE"; mkdir -p "$SITE/pyccl"
  cp -r ccl/. "$SITE/pyccl/"; rm -f "$SITE"/pyccl/_native*.so "$SITE"/pyccl/_verbs*.so
  cp -r transports "$SITE/pyccl/transports"; cp -r topology "$SITE/pyccl/topology"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
