"""The batching schedule: every row once an epoch, wrapping at its end, a step's rows split among processes in
micro-batches, evaluations, refusals; and a real training run on the tiny model takes exactly the steps,
micro-batches and evaluations the schedule says."""

import json

import pytest

import camelid.train.loop as loop
from camelid.data.identity import identity_conversations
from camelid.errors import CamelidError
from camelid.train.recipe import build_config
from camelid.train.schedule import Schedule, eval_batches, held_out_size


def recipe(**kw):
    values = dict(model="m", data="d.jsonl", out="o", batch_size=8, micro_batch_size=2, epochs=2, seed=7)
    return build_config({**values, **kw})


def test_each_epoch_takes_every_row_once_in_an_order_of_its_own():
    schedule = Schedule.plan(recipe(), rows=24)
    assert (schedule.steps_per_epoch, schedule.steps) == (3, 6)
    epochs = [sum((schedule.rows_for_step(s) for s in range(e * 3, e * 3 + 3)), []) for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert epochs[0] != epochs[1]


def test_the_last_step_of_an_epoch_wraps_around_to_its_start():
    schedule = Schedule.plan(recipe(), rows=20)  # 3 steps an epoch: 8, 8, then 4 + the first 4 again
    assert schedule.rows_for_step(2)[4:] == schedule.rows_for_step(0)[:4]
    assert len(set(schedule.rows_for_step(2))) == 8


def test_a_step_is_a_function_of_seed_and_step_alone():
    # What resuming relies on: a fresh schedule, asked for a step out of order, gives the same rows.
    one = Schedule.plan(recipe(), rows=50)
    forward = [one.rows_for_step(s) for s in range(one.steps)]
    backward = [Schedule.plan(recipe(), rows=50).rows_for_step(s) for s in reversed(range(one.steps))]
    assert backward == forward[::-1]
    assert one.rows_for_step(3) != Schedule.plan(recipe(seed=8), rows=50).rows_for_step(3)


def test_steps_round_up_and_max_steps_overrides_epochs():
    assert Schedule.plan(recipe(epochs=1.5), rows=20).steps == 5  # ceil(1.5 x 3)
    assert Schedule.plan(recipe(max_steps=7), rows=20).steps == 7


def test_micro_batches_split_a_step_among_processes():
    schedule = Schedule.plan(recipe(), rows=40, world=2)
    ids = schedule.rows_for_step(0)
    parts = {rank: schedule.micro_batches(ids, rank) for rank in range(2)}
    assert schedule.accumulate == 2 and all(len(p) == 2 for p in parts.values())
    assert all(len(part) == 2 for p in parts.values() for part in p)
    assert sum(parts[0], []) == ids[0::2] and sum(parts[1], []) == ids[1::2]


@pytest.mark.parametrize("eval_every, after", [(3, [3, 6, 8]), (4, [4, 8]), (0, [8])])
def test_evaluations_come_every_eval_every_steps_and_at_the_end(eval_every, after):
    schedule = Schedule.plan(recipe(max_steps=8, eval_every=eval_every), rows=16)
    assert [s + 1 for s in range(schedule.steps) if schedule.evaluates_after(s)] == after
    assert schedule.evaluations == len(after)


def test_held_out_rows_are_evaluated_in_micro_batches_and_the_split_holds_at_least_one():
    assert [list(range(5))[part] for part in eval_batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert (held_out_size(100, 0.1), held_out_size(5, 0.05), held_out_size(5, 0.0)) == (10, 1, 0)


def test_refusals_name_the_fix():
    with pytest.raises(CamelidError, match=r"batch_size 8 is not a multiple of micro_batch_size 2 x 3 GPU\(s\); "
                                           "make batch_size a multiple of 6"):
        Schedule.plan(recipe(), rows=100, world=3, processes="GPU(s)")
    with pytest.raises(CamelidError, match=r"the data makes 7 training sequences, fewer than one batch \(8\)"):
        Schedule.plan(recipe(), rows=7)


def test_a_real_run_takes_the_scheduled_steps_micro_batches_and_evaluations(tiny_chat_dir, tmp_path, monkeypatch):
    data = tmp_path / "identity.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in identity_conversations()))
    # One example a row, so rows differ in length; 1.5 epochs of a row count that batches do not divide: the
    # run wraps at the first epoch's end and reshuffles for the second.
    cfg = build_config(dict(model=str(tiny_chat_dir), data=[str(data)], out=str(tmp_path / "run"), seq_len=256,
                            packing=False, batch_size=8, micro_batch_size=2, epochs=1.5, eval_fraction=0.1,
                            eval_every=4, lr=1e-3, warmup_ratio=0.0, seed=3))
    built, collated = [], []

    def prepared_rows(*args):
        built.append(loop_prepared_rows(*args))
        return built[-1]

    def collate(rows):
        collated.append([r.tokens for r in rows])
        return loop_collate(rows)

    loop_prepared_rows, loop_collate = loop.prepared_rows, loop.collate
    monkeypatch.setattr(loop, "prepared_rows", prepared_rows)
    monkeypatch.setattr(loop, "collate", collate)
    loop.train(cfg, progress=False, log=lambda message: None)

    [(rows, eval_rows)] = built
    schedule = Schedule.plan(cfg, len(rows))
    assert len(rows) % cfg.batch_size and schedule.steps > schedule.steps_per_epoch  # the run wraps and reshuffles
    expected, tokens = [], []
    for step in range(schedule.steps):
        ids = schedule.rows_for_step(step)
        expected += [[rows[i].tokens for i in part] for part in schedule.micro_batches(ids, 0)]
        tokens.append(sum(len(rows[i].tokens) for i in ids))
        if schedule.evaluates_after(step):
            expected += [[r.tokens for r in eval_rows[part]] for part in eval_batches(len(eval_rows), 2)]
    assert collated == expected
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["tokens"] for m in metrics] == tokens
    assert [m["step"] for m in metrics if "eval_loss" in m] == [4, 8, 12, schedule.steps]
    assert metrics[-1]["epoch"] == round(schedule.steps / schedule.steps_per_epoch, 4)
