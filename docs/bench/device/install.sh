#!/usr/bin/env bash
# On the device, the last call (carry the kit's last part and .whl; the parts before it
# are in /tmp/k from the calls before, one part a call): vLLM, wheels and models as the
# kit installs them, then the extra wheels, into /tmp/site; prints what the machine is.
set -euo pipefail
cp .devkit/kit.part.* /tmp/k/  # what this call carried
(cd /tmp/k && cat kit.part.* | tar xf - && bash kit/install.sh)
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN || true
# The project runs from this tree on PYTHONPATH, uninstalled: its vLLM plugin (pyproject's
# entry point, run in the EngineCores vLLM spawns) is registered beside vLLM by hand.
python3 docs/bench/device/register_plugin.py /tmp/site
PYTHONPATH=/tmp/site:$PWD python3 -c "from yapd import vllm_plugin; print('yapd vLLM plugin:', vllm_plugin.loadable() or 'registered')"
PYTHONPATH=/tmp/site:$PWD python3 -c "import vllm, uvloop, prometheus_client, pytest_asyncio, yapd.daemon; print('ok, vllm', vllm.__version__)"
command -v nvidia-cuda-mps-control || echo "no MPS control binary"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
