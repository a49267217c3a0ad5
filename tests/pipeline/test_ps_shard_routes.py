"""The sharded server's routes on a real in-process cluster (gen_cluster): the scheduler's
coordination and the shards' drop rule. Kept apart from test_ps_shard.py, whose module-scoped
cluster gen_cluster's cleanup of child processes would end."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PSError


def test_the_scheduler_forwards_a_finished_task_s_drop_to_every_shard_but_spares_a_rejoined_one() -> None:
    """The scheduler keeps the shard map and which task is which participant: a task that ends
    leaves every shard's round; a drop that arrives after its participant joined again (a retried
    task, a later ticket) leaves it in."""
    import asyncio

    from distributed import Event
    from distributed.utils_test import gen_cluster

    from pipeline.ps import ParameterServerExtension
    from pipeline.ps.shard import install_shard

    @gen_cluster(client=True)
    async def main(c, s, a, b):
        ext = ParameterServerExtension(s)
        shards = {w.address: install_shard(w) for w in (a, b)}
        cuts = [(a.address, 0, 3), (b.address, 3, 5)]
        for addr, lo, hi in cuts:
            await c.rpc(addr).ps_create(job="j", params=np.zeros(hi - lo, np.float32), n_params=hi - lo, mode="sync")
        await c.scheduler.ps_place(job="j", shards=cuts, n_params=5)
        with pytest.raises(PSError, match="must cover"):
            await c.scheduler.ps_place(job="k", shards=[(a.address, 0, 2), (b.address, 3, 5)], n_params=5)
        ev = Event("go")

        def hold(name: str) -> None:
            Event("go").wait(30)

        fut = c.submit(hold, "p", key="task-p")
        while "task-p" not in s.tasks or s.tasks["task-p"].state != "processing":
            await asyncio.sleep(0.01)
        r = await c.scheduler.ps_shards(job="j", names=["p"], keys=["task-p"], worker=a.address)
        assert [tuple(x) for x in r["shards"]] == cuts and ext.key_to_participant["task-p"] == ("j", "p")
        for addr, _, _ in cuts:
            await c.rpc(addr).ps_join(job="j", name="p", ticket=r["ticket"])
        await ev.set()
        await fut
        for _ in range(200):  # forwarded in the background
            if not any("p" in sh.jobs["j"].participants for sh in shards.values()):
                break
            await asyncio.sleep(0.01)
        assert not any("p" in sh.jobs["j"].participants for sh in shards.values())
        # a retried task joined again (a later ticket) before the drop of its first run arrived
        later = await c.scheduler.ps_shards(job="j", names=["p"], keys=["task-p2"], worker=b.address)
        await c.rpc(a.address).ps_join(job="j", name="p", ticket=later["ticket"])
        await c.rpc(a.address).ps_drop(job="j", name="p", ticket=r["ticket"], why="late")
        assert "p" in shards[a.address].jobs["j"].participants
        await c.scheduler.ps_close(job="j")
        assert "j" not in ext.sharded and "task-p2" not in ext.key_to_participant

    main()
