#!/bin/sh
# entry-points.sh DIR PYTHON [SRC] [CONFIG] - write the system bus's two programs into DIR:
#   sealbus-launcher  (labelled sealbus_launch_exec_t: init enters sealbus_launch_t here)
#   sealbus-broker    (labelled sealbus_exec_t: the launcher enters sealbus_t by executing it)
# Python scripts, not shell wrappers: the domains map their interpreter, and the broker's
# domain may map nothing but python and its libraries. SRC: a source tree to import broker
# from (empty: the installed package). CONFIG: the config the launcher reads unless
# its command line names another (empty: the built-in default).
set -eu
[ $# -ge 2 ] || { echo "usage: entry-points.sh DIR PYTHON [SRC] [CONFIG]" >&2; exit 2; }
dir=$1 python=$2 src=${3:-} config=${4:-}
path_line="" config_args=""
[ -z "$src" ] || path_line="sys.path.insert(0, \"$src\")"
[ -z "$config" ] || config_args="\"--config\", \"$config\", "
install -d "$dir"
cat > "$dir/sealbus-launcher" <<EOS
#!$python -IB
"""The sealbus system bus launcher: sealbus run --system."""
import sys
$path_line
from broker.cli import main
sys.exit(main(["run", "--system", ${config_args}*sys.argv[1:]]))
EOS
cat > "$dir/sealbus-broker" <<EOS
#!$python -IB
"""The sealbus broker process, started by the launcher."""
import runpy, sys
$path_line
runpy.run_module("broker.launch.broker_process", run_name="__main__")
EOS
chmod 0755 "$dir/sealbus-launcher" "$dir/sealbus-broker"
