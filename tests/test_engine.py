"""Pure pieces of the engine set-up: LR schedule, weight-decay groups, DeepSpeed config."""

from __future__ import annotations

import random
import socket

import pytest
import torch

from cluster.env import ephemeral_port_range, free_port, read_dist_env
from pretrain.config import RunConfig
from pretrain.engine import Runtime, deepspeed_config, lr_multiplier, param_groups


def test_lr_warmup_then_cosine_to_the_floor():
    values = [lr_multiplier(step, warmup_steps=10, total_steps=110, min_ratio=0.1) for step in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55)  # halfway through the cosine
    assert values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_weight_decay_skips_biases_norms_and_embeddings(make_model):
    model = make_model()
    groups = param_groups(model, weight_decay=0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    named = dict(model.named_parameters())
    assert id(named["unet.conv_in.weight"]) in decayed
    assert id(named["unet.conv_in.bias"]) not in decayed
    assert id(named["unet.time_embedding.linear_1.weight"]) in decayed  # an MLP, not an embedding table
    assert id(named["unet.mid_fusion.layers.0.norm_self.weight"]) not in decayed
    assert id(named["text_encoder.model.text_model.embeddings.token_embedding.weight"]) not in decayed
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    with_temperature = param_groups(model, 0.05, temperature_lr=0.03)
    assert len(with_temperature) == 2  # the bare model has no temperature: no empty third group


def test_text_encoder_weight_decay_gets_a_group_of_its_own(make_model):
    model = make_model()
    named = dict(model.named_parameters())
    groups = param_groups(model, weight_decay=0.2, text_encoder_weight_decay=0.01)
    by_rate = {group["weight_decay"]: {id(p) for p in group["params"]} for group in groups}
    text_matrices = {id(p) for n, p in named.items() if n.startswith("text_encoder.") and id(p) not in by_rate[0.0]}
    assert text_matrices and by_rate[0.01] == text_matrices  # every decayed text-encoder weight, nothing else
    assert id(named["unet.conv_in.weight"]) in by_rate[0.2]
    assert id(named["text_encoder.model.text_model.embeddings.token_embedding.weight"]) in by_rate[0.0]
    same_rate = param_groups(model, weight_decay=0.2)
    assert len(same_rate) == 2 and {id(p) for p in same_rate[0]["params"]} == by_rate[0.2] | by_rate[0.01]


def test_deepspeed_config_sets_clipping_and_splits_the_global_batch():
    config = RunConfig()
    ds = deepspeed_config(config, world_size=2, runtime=Runtime(torch.device("cpu"), "gloo", False))
    assert ds["train_micro_batch_size_per_gpu"] * 2 == config.train.batch_size
    assert ds["gradient_clipping"] == config.optim.grad_clip
    with pytest.raises(ValueError, match="batch_size"):
        deepspeed_config(config, world_size=3, runtime=Runtime(torch.device("cpu"), "gloo", False))


def test_dist_env_reads_torchrun_then_slurm():
    assert read_dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1234"}).rank == 1
    slurm = read_dist_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "MASTER_ADDR": "node0"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr) == (3, 4, 1, "node0")
    single = read_dist_env({})
    assert (single.rank, single.world_size) == (0, 1) and single.master_port > 0


def test_free_port_avoids_the_ephemeral_range_and_skips_taken_ports():
    low, high = ephemeral_port_range()
    port = free_port(random.Random(7))
    assert not low <= port <= high, (port, low, high)
    with socket.socket() as listener:  # take the port the same seed picks first
        listener.bind(("127.0.0.1", port))
        listener.listen()
        other = free_port(random.Random(7))
    assert other != port and not low <= other <= high


def test_a_single_process_ignores_an_inherited_master_port_that_is_taken():
    with socket.socket() as holder:  # e.g. the parent's own TCPStore, exported as MASTER_PORT
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        single = read_dist_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(taken)})
        assert single.master_port != taken
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", single.master_port))
    assert read_dist_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": str(taken)}).master_port == taken
