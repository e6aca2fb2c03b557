"""Data from PyTorch: split() and split_plan() take a map-style Dataset or a DataLoader over one (its
sampler, collate_fn and workers), its rows streamed per step (splitlearn.data.torchdata)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset

import splitlearn
from splitlearn import PlanError
from splitlearn.api import split_plan
from splitlearn.core.load import load_plan
from splitlearn.core.specs import DataSpec
from splitlearn.data import DataError, batches, train_test_split_ids
from splitlearn.run.setup import prepare, schedule

ROWS, BATCH, EPOCHS, SEED = 120, 16, 2, 0


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(ROWS, 6, generator=torch.Generator().manual_seed(3))
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def _weights(result) -> dict[str, torch.Tensor]:
    return result.model.state_dict()


def _same(a, b, tol: float = 1e-6) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= tol, k


def _split(data, model=None, **kw):
    return splitlearn.split(model or _model(), cut=1, data=data, epochs=EPOCHS, batch_size=BATCH, lr=1e-2,
                            seed=SEED, **kw)


class ScheduleOrder(Sampler[int]):
    """A custom sampler: each epoch, the order splitlearn's own schedule draws (``data.batches`` of the plan
    seed over the training rows), one epoch per ``__iter__``."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def __iter__(self):
        order = np.concatenate(batches(self.n, BATCH, SEED, self.epoch))
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n


def _held_out():
    """The tensors' training and test rows as splitlearn splits them (plan seed, test_fraction 0.2)."""
    train, test = train_test_split_ids(np.arange(ROWS), 0.2, SEED)
    x, y = _rows()
    return (x[train], y[train]), (x[test], y[test])


def test_a_dataloader_with_a_custom_sampler_equals_the_same_rows_as_tensors():
    """The honest comparison: the tensors (x, y) are trained with splitlearn's split and shuffled schedule; the
    DataLoader holds the same training rows (in id order) with a custom sampler that draws, each epoch, the
    order that schedule draws, in batches of the same size, and the same test rows as its test data. Same rows,
    same batches, same order: the weights must agree (and the test accuracy, over the same test rows)."""
    (xt, yt), (xs, ys) = _held_out()
    model = _model()
    as_tensors = _split(_rows(), model)
    loader = DataLoader(TensorDataset(xt, yt), batch_size=BATCH, sampler=ScheduleOrder(len(xt)))
    as_loader = _split(loader, model, test_data=TensorDataset(xs, ys))  # (or data=(loader, test rows))
    _same(as_tensors, as_loader)
    assert as_loader["metrics"]["test_accuracy"] == as_tensors["metrics"]["test_accuracy"]
    assert as_loader.plan.data.dataset == "torch"


def test_the_dataloaders_own_sampler_draws_the_batches():
    """A RandomSampler with its own generator: the batches are its draws (not splitlearn's shuffle), so a
    different generator seed gives different weights, and the same seed the same weights."""
    (xt, yt), test = _held_out()
    model = _model()

    def run(seed: int):
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(TensorDataset(xt, yt), batch_size=BATCH, shuffle=True, generator=gen)
        return _split((loader, TensorDataset(*test)), model)

    a, b, c = run(1), run(1), run(2)
    _same(a, b, tol=0.0)
    assert any((a.model.state_dict()[k] - c.model.state_dict()[k]).abs().max() > 1e-4 for k in a.model.state_dict())


class InWorkers(TensorDataset):
    """Counts the rows read in DataLoader worker processes (a counter shared with them)."""

    def __init__(self, *tensors):
        super().__init__(*tensors)
        self.in_workers = torch.multiprocessing.get_context("fork").Value("i", 0)

    def __getitem__(self, i):
        if torch.utils.data.get_worker_info() is not None:
            with self.in_workers.get_lock():
                self.in_workers.value += 1
        return super().__getitem__(i)


def test_workers_read_the_training_rows_and_give_the_weights_of_the_main_process():
    (xt, yt), test = _held_out()
    model = _model()
    datasets = {w: InWorkers(xt, yt) for w in (0, 2)}
    runs = [_split((DataLoader(datasets[w], batch_size=BATCH, sampler=ScheduleOrder(len(xt)), num_workers=w,
                               multiprocessing_context="fork" if w else None), TensorDataset(*test)), model)
            for w in (0, 2)]
    _same(*runs, tol=0.0)
    assert datasets[0].in_workers.value == 0
    # by the workers: the labels' one pass (no dataset.targets), then every training row of every epoch
    assert datasets[2].in_workers.value == (1 + EPOCHS) * len(xt)


class Dicts(Dataset):
    """Items as dicts of tensors: the keys are the fields."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "y": self.y[i]}


def test_a_dataset_of_dicts_equals_the_tensors():
    """A bare Dataset takes splitlearn's split (test_fraction) and schedule: the same as the tensors."""
    model = _model()
    x, y = _rows()
    _same(_split((x, y), model), _split(Dicts(x, y), model, inputs="features"), tol=0.0)


class Counting(Dataset):
    """Counts what is asked of it; ``__getitems__`` (what a DataLoader calls for a batch) records each request."""

    def __init__(self, x, y, targets: bool):
        self.x, self.y = x, y
        self.requests: list[int] = []
        if targets:
            self.targets = y.tolist()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]

    def __getitems__(self, idx: list[int]):
        self.requests.append(len(idx))
        return [self[i] for i in idx]


@pytest.mark.parametrize("targets", [True, False], ids=["targets", "one_pass"])
def test_rows_are_streamed_a_batch_at_a_time(targets):
    """Every read asks the dataset for one step's rows, never more: the source's one sample row, the plan's dry
    run on one row (the handshake reuses it), then per epoch each training batch and the test rows' one
    evaluation batch. Labels come from ``targets``; without it, from one pass of batch-sized reads."""
    x, y = _rows()
    ds = Counting(x, y, targets)
    result = _split(ds, _model())
    rows = result["parties"]["client"]["data"]
    assert (rows["train"], rows["test"]) == (96, 24)
    labels = [] if targets else [BATCH] * (ROWS // BATCH) + [ROWS % BATCH]  # every row, in order
    epoch = [BATCH] * (96 // BATCH) + [24]
    assert ds.requests == [1] + labels + [1] + epoch * EPOCHS


class Stream(IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(6), 0)])


@pytest.mark.parametrize("data, message", [
    (Stream(), r"IterableDataset \(Stream\): its rows cannot be addressed"),
    (DataLoader(TensorDataset(*_rows()), batch_size=BATCH), r"DataLoader's sampler draws .* give the test rows apart"),
    (DataLoader(TensorDataset(*_rows()), batch_size=None), r"DataLoader without batches \(batch_size=None\)"),
    (TensorDataset(torch.zeros(4, 6), torch.zeros(4), torch.zeros(4)), r"a batch is a list of 3: items must be a pair"),
])
def test_data_that_cannot_be_streamed_is_refused_naming_why(data, message):
    with pytest.raises(PlanError, match=message):
        split_plan(_model(), 1, data=data)


def test_a_dataloader_drawing_batches_larger_than_the_plans_is_refused():
    (xt, yt), test = _held_out()
    loader = DataLoader(TensorDataset(xt, yt), batch_size=2 * BATCH)
    with pytest.raises(PlanError, match=rf"batches of up to {2 * BATCH} rows, but \[train\] batch_size is {BATCH}"):
        _split((loader, TensorDataset(*test)))


def test_a_plan_without_the_dataset_object_is_refused_as_in_a_party_process():
    """What a party process (or a plan file) holds: ``dataset = "torch"`` without the object."""
    plan = split_plan(_model, 1, data=TensorDataset(*_rows())).model_dump()  # (the model: an importable factory)
    assert plan["data"]["dataset"] == "torch"
    with pytest.raises(PlanError, match=r"dataset 'torch' is a Dataset or DataLoader given in Python .*"
                                        r"\(launcher='threads'\)"):
        prepare(plan)
    with pytest.raises(PlanError, match="built in Python"):
        splitlearn.train(split_plan(_model(), 1, data=TensorDataset(*_rows())), launcher="processes", out="unused")


def test_preprocessing_options_are_refused_for_a_torch_dataset():
    spec = DataSpec.of_torch(TensorDataset(*_rows()))
    spec = spec.model_copy(update={"options": {"standardize": True}})
    with pytest.raises(PlanError, match=r"transforms are the Dataset's own \(standardize and normalize are not"):
        prepare(split_plan(_model(), 1, data=spec))


def test_targets_that_differ_from_the_items_labels_stop_the_run_naming_them():
    """``dataset.targets`` gives the labels up front, checked against the items' own: the row read for the
    fields' shapes before training (a PlanError, as here), then every batch read."""
    x, y = _rows()
    ds = Counting(x, y, targets=True)
    ds.targets = (1 - y).tolist()  # e.g. a target_transform the targets do not know of
    with pytest.raises(PlanError, match=r"dataset.targets differs from the labels the dataset's items give"):
        _split(ds)


def _pipelined(plan, pipeline: int):
    """``plan`` with ``[train] pipeline`` set (its data objects kept)."""
    return plan.model_copy(update={"train": plan.train.model_copy(update={"pipeline": pipeline})})


def test_a_pipelined_step_reads_its_rows_once_and_trains_as_one_batch():
    """With ``pipeline = 2`` a step's first micro-batch reads the whole step's rows through the loader, the other
    takes its rows from that batch: the dataset is asked for exactly what ``pipeline = 1`` asks (each training row
    once per epoch, one request per step), and the weights agree with ``pipeline = 1``'s."""
    x, y = _rows()
    model = _model()
    datasets = {p: Counting(x, y, targets=True) for p in (1, 2)}
    runs = {p: splitlearn.train(_pipelined(split_plan(model, 1, data=datasets[p], epochs=EPOCHS, batch_size=BATCH,
                                                      lr=1e-2, seed=SEED), p)) for p in (1, 2)}
    epoch = [BATCH] * (96 // BATCH) + [24]
    assert datasets[2].requests == datasets[1].requests == [1, 1] + epoch * EPOCHS
    _same(runs[1], runs[2], tol=1e-6)


def test_a_reader_streams_its_own_partys_steps_whatever_a_party_without_data_schedules_after_it():
    """A party holding no data schedules positions from counts alone (as over a network), which are not the
    holder's rows of the dataset: whichever party's thread derives its schedule last, the holder's reader
    streams its own steps, so a pipelined step's first micro-batch still reads the whole step, once."""
    x, y = _rows()
    data = Counting(x, y, targets=True)
    plan, setups, _ = prepare(_pipelined(split_plan(_model(), 1, data=data, epochs=EPOCHS, batch_size=BATCH,
                                                    lr=1e-2, seed=SEED), 2))
    steps = {p: [s.rows for s in schedule(plan, setups[p].splits) if s.mode == "train"] for p in ("client", "server")}
    first = steps["client"][0]
    assert not torch.equal(first, steps["server"][0])  # (the server's schedule ran last)
    before = len(data.requests)
    got = torch.cat([setups["client"].inputs["client.x"][half] for half in torch.tensor_split(first, 2)])
    assert data.requests[before:] == [BATCH]
    assert torch.equal(got, x[first])


class Redrawn(Counting):
    """Labels that change per draw (as label noise, MixUp or CutMix would): each read of a row flips its label."""

    def __init__(self, x, y):
        super().__init__(x, y, targets=False)
        self.draws = np.zeros(len(x), dtype=np.int64)

    def __getitem__(self, i: int):
        self.draws[i] += 1
        return self.x[i], (self.y[i] + self.draws[i]) % 2


def test_labels_that_change_per_draw_stop_the_run_naming_the_rows():
    """Without ``dataset.targets`` the labels are read in one pass up front (the loss, its classes and checks use
    them); a batch read later whose labels differ is an error, never trained against the other labels."""
    x, y = _rows()
    with pytest.raises(DataError, match=r"field 'y' of rows \[0\] differs from the labels read for them up front: "
                                        r"labels must be a function of the row"):
        _split(Redrawn(x, y))


def test_parties_reading_torch_data_of_their_own_beside_a_dataloader_are_refused_naming_them():
    """A DataLoader's sampler draws every party's steps: another party's own torch data cannot follow them."""
    (xt, yt), (xs, ys) = _held_out()
    plan = split_plan(_model(), 1, data=TensorDataset(xt, yt))
    body = plan.model_dump()
    body["data"] = plan.data
    body["parties"]["client"]["data"] = DataSpec.of_torch(DataLoader(TensorDataset(xt, yt), batch_size=BATCH),
                                                          TensorDataset(xs, ys))
    body["parties"]["server"]["data"] = DataSpec.of_torch(TensorDataset(xt, yt))
    body["parties"]["client"]["holds"], body["parties"]["server"]["holds"] = {"x": "x"}, {"y": "y"}
    body["losses"]["task"]["target"] = "server.y"
    body["networks"]["model"] = _model
    with pytest.raises(PlanError, match=r"parties 'client' \(a DataLoader\) and 'server' \(a Dataset\) each read "
                                        r"torch data of their own"):
        prepare(load_plan(body))


class Noisy(TensorDataset):
    """A random transform drawing from torch's global generator, as torchvision's do."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x + 0.5 * torch.randn(x.shape), y


@pytest.mark.parametrize("loader", [False, True], ids=["dataset", "loader_no_workers"])
def test_random_transforms_read_in_the_partys_thread_draw_the_partys_stream(loader):
    """Read without workers, a dataset's random transforms draw from the party's own stream (plan seed and party
    name): the same seed gives the same weights whatever the caller's generator holds, which is left as it was."""
    (xt, yt), test = _held_out()
    model = _model()

    def run(caller_seed: int):
        data = Noisy(xt, yt)
        if loader:
            data = (DataLoader(data, batch_size=BATCH, sampler=ScheduleOrder(len(xt))), TensorDataset(*test))
        torch.manual_seed(caller_seed)
        before = torch.random.get_rng_state()
        result = _split(data, model)
        assert torch.equal(torch.random.get_rng_state(), before)
        return result

    _same(run(1), run(2), tol=0.0)
