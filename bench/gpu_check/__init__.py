"""The GPU check (bench/gpu_check.sh): run.py times and reports the parts, part.py runs one in its own process."""
