# Sourced by the sbatch scripts in this folder. PLAN=DIR (a `tools/tune_deepspeed.py --out DIR` folder) sets the
# layout, batch and DeepSpeed JSON variables from DIR/plan.env before the scripts apply their own defaults, so
# plan -> launch is one step:  PLAN=tuned_plan sbatch --nodes=2 examples/slurm/pretrain_tinyllama_1.1b.sbatch
# A plan made for another number of nodes is refused with one line.
if [ -n "${PLAN:-}" ]; then
  if [ ! -f "$PLAN/plan.env" ]; then
    echo "error: PLAN=$PLAN: no plan.env there (tools/tune_deepspeed.py --out DIR writes it)" >&2
    exit 1
  fi
  # shellcheck disable=SC1091
  source "$PLAN/plan.env"
  if [ -n "${SLURM_NNODES:-}" ] && [ "$SLURM_NNODES" != "${NODES:-$SLURM_NNODES}" ]; then
    echo "error: PLAN=$PLAN was tuned for $NODES nodes but this job has $SLURM_NNODES: sbatch --nodes=$NODES" >&2
    exit 1
  fi
fi
