# Sourced by the launch scripts, from the repository root: $msdda is the msdda command ($MSDDA, else the
# project's .venv/bin/msdda, else msdda on PATH); train_adapter FOLDER RECIPE [override ...] trains an adapter
# unless FOLDER/final holds a finished one, and resumes from FOLDER's newest checkpoint when a run there was started;
# calibrate_adapter ADAPTER OUT [option ...] fits ADAPTER's per-step scales into OUT (msdda calibrate) unless OUT holds
# a calibrated adapter;
# stage MESSAGE prints MESSAGE with the seconds since the script sourced this file.
msdda="${MSDDA:-.venv/bin/msdda}"
[ -x "$msdda" ] || msdda=msdda
launch_started=$(date +%s)
stage() { echo "$(basename "$0" .sh): $1 after $(( $(date +%s) - launch_started )) s"; }

train_adapter() {
    local folder="$1" recipe="$2"
    shift 2
    if [ -f "$folder/final/msdda_adapter.json" ]; then
        echo "$(basename "$0" .sh): $folder/final exists; not retraining"
        return
    fi
    local resume=()
    [ -f "$folder/run_config.yaml" ] && resume=(--resume)
    "$msdda" train --config "$recipe" "$@" "output_dir=$folder" "${resume[@]}"
}

calibrate_adapter() {
    local adapter="$1" out="$2"
    shift 2
    if [ -f "$out/msdda_adapter.json" ]; then
        echo "$(basename "$0" .sh): $out exists; not recalibrating"
        return
    fi
    "$msdda" calibrate "$adapter" --out "$out" "$@"
}
