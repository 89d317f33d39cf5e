# Sourced by the launch scripts: train_adapter FOLDER RECIPE [override ...] trains an adapter unless FOLDER/final
# holds a finished one, and resumes from FOLDER's newest checkpoint when a run there was started.
# Needs $msdda (the msdda command) set by the sourcing script.
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
