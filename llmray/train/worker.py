"""What Ray Train runs on each worker: find the checkpoint to resume, connect this rank to the token stream,
report through Ray Train, train. The driver side is `trainer.py`."""

from __future__ import annotations

import tempfile
import time
import uuid

import ray
import ray.train

from llmray import logs
from llmray.data.stream import RankStream
from llmray.recipe.load import recipe_from_dict
from llmray.train.checkpoint import CheckpointUploadError
from llmray.train.wandb_log import WandbSink

REPORT_MIN_INTERVAL_S = 2.5  # Ray Train's controller polls workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)


class RaySink:
    """Checkpoints and evaluations always go to Ray Train (Tune's schedulers compare trials on them); plain
    metrics at most every REPORT_MIN_INTERVAL_S. Ray Train keeps one pending result per worker and its
    controller collects it every couple of seconds, so a second report inside that interval blocks the
    training step until then. Rank 0 decides, for all."""

    def __init__(self, run_folder: str):
        self.run_folder, self.last = run_folder, 0.0

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import torch
        import torch.distributed as dist

        from llmray import metric_names as M

        if checkpoint_dir is None and M.VAL_LOSS not in metrics:  # every rank evaluates at the same steps
            due = torch.tensor([time.monotonic() - self.last >= REPORT_MIN_INTERVAL_S], dtype=torch.int32,
                               device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(due, src=0)
            if not due.item():
                return
        self.last = time.monotonic()
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        try:  # Ray Train uploads each rank's part here, and records the checkpoint once every rank's is in
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))
        except OSError as e:  # the storage's (pyarrow's filesystems raise OSError); anything else goes up as it is
            cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CheckpointUploadError(
                f"the checkpoint of step {metrics.get(M.STEP)} could not be written to {self.run_folder}: {cause}. "
                "The run's earlier checkpoints are intact, and this one is never resumed from") from e


def train_loop_per_worker(config: dict) -> None:
    """The checkpoint to resume is this run's latest after a failure or a rerun (Ray Train's), else the one
    `--resume-from` named; the loop restores it, the stream position included."""
    import torch.distributed as dist

    logs.quiet_here()
    with logs.hush_stdout():  # DeepSpeed prints which optional kernels (triton) it lacks
        from llmray.train import loop  # imported here: the driver that pickles this function needs no DeepSpeed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    recipe = recipe_from_dict(config["recipe"]).at_world_size(world)  # an elastic group may have shrunk
    val = [(name, weight, ray.get(ref)) for name, weight, ref in config["val"]] or None
    # One stream session per worker group: a restarted or resized group gets a new one, and the catalog
    # restarts the pipeline where the group resumes.
    session = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(session, src=0)
    stream = RankStream(config["catalog"], session[0], rank, world, recipe.train.micro_batch_size,
                        recipe.data.prefetch_batches)
    resume = ray.train.get_checkpoint()
    if resume is None:
        resume = config.get("resume_from")  # a ray.train.Checkpoint carrying the driver's filesystem
    sink = WandbSink(RaySink(recipe.run.folder), recipe, rank)
    with tempfile.TemporaryDirectory(prefix="llmray-resume-") as tmp:
        if resume is not None:
            resume.to_directory(tmp)
        loop.train(recipe, stream, val, sink, resume_dir=tmp if resume is not None else None,
                   tasks=config.get("eval_tasks"), generators=config.get("generators"))
    sink.finish()
