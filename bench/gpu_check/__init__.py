"""The GPU check (bench/gpu_check.sh): run.py runs the parts in their time boxes, part.py runs one in its own
process, report.py writes what they found."""
