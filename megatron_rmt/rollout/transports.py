"""How the weight buckets travel from the trainer's rank 0 to one vLLM server's workers: the
trainer side of vLLM's weight-transfer backends.

- `GlooTransport` pairs with this project's `gloo` backend (`megatron_rmt_vllm`, a vLLM plugin):
  any host, CPU or GPU server, over TCP. The trainer hosts the TCP store.
- `NcclTransport` pairs with vLLM's built-in `nccl` backend (GPU servers): vLLM's own trainer
  endpoint and packed broadcast (double-buffered 1 GiB chunks by default), so the trainer needs
  vLLM importable on GPU hosts. Untested here (no GPU): it follows vLLM 0.32's
  `NCCLTrainerWeightTransferEngine` call for call.

`timeout_s` bounds the rendezvous, each broadcast and the server calls that span them
(init, update); the client makes it at least 30 s (`transfer_timeout`): opening a group or
loading a bucket on a loaded host can take longer than one rollout request.

One group per server (world size 1 + that server's workers): a server that dies or restarts is
reconnected alone, the others keep theirs. `connect` runs the server's
`/init_weight_transfer_engine` while the trainer joins, as both sides rendezvous together; `send`
runs `/update_weights` (the workers receive) while the trainer broadcasts one bucket. A server
call that fails ends the operation at once (a server without the backend answers HTTP 500): the
trainer's side, which that server will never join, is abandoned to its own timeout, and the
server is reconnected with a fresh group next time.
"""

import datetime
import socket
import threading
import urllib.parse

import torch
import torch.distributed as dist

from megatron_rmt_vllm import wire


def local_address_towards(url: str) -> str:
    """This host's address on the route to the server (no packet is sent)."""
    host = urllib.parse.urlsplit(url).hostname
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def _while(server_call, transfer):
    """Run the trainer's side of a `transfer` (in a daemon thread) while the `server_call` runs
    here; both must succeed. A server call that fails raises at once: the transfer, which that
    server will never join, is left to end by its own timeout instead of being waited for (a
    server started without the backend answers HTTP 500 within milliseconds)."""
    outcome, done = {}, threading.Event()

    def run():
        try:
            outcome["result"] = transfer()
        except BaseException as e:  # re-raised below once the server call has succeeded
            outcome["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="weight-transfer", daemon=True).start()
    server_call()
    done.wait()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _init_on_server(url: str, call, info: dict, backend: str, wait: dict) -> None:
    try:
        call(url, "/init_weight_transfer_engine", {"init_info": info}, **wait)
    except OSError as e:
        raise OSError(
            f"{url} did not open a {backend} weight transfer (is it serving with "
            f"`--weight-transfer {backend}`, see megatron_rmt.rollout.serve?): {e}"
        ) from e


class GlooTransport:
    backend = "gloo"

    def __init__(self, timeout_s: float, address: str | None = None):
        self.timeout_s = timeout_s
        self.wait = {"timeout": timeout_s}  # for the server calls that span a transfer
        self.address = address
        self.groups: dict[str, dist.ProcessGroupGloo] = {}

    def connect(self, url: str, call, workers: int) -> None:
        address = self.address or local_address_towards(url)
        store = dist.TCPStore(
            address, 0, 1 + workers, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=self.timeout_s),
        )  # fmt: skip
        info = {
            "master_address": address, "master_port": store.port, "world_size": 1 + workers,
            "rank_offset": 1, "timeout_s": self.timeout_s,
        }  # fmt: skip
        self.groups[url] = _while(
            lambda: _init_on_server(url, call, info, self.backend, self.wait),
            lambda: wire.open_group(store, 0, 1 + workers, self.timeout_s),
        )

    def pack(self, names: list[str], tensors: list[torch.Tensor]):
        return wire.describe(names, tensors), tensors

    def send(self, url: str, info: dict, tensors: list[torch.Tensor], call) -> None:
        group = self.groups[url]
        _while(
            lambda: call(url, "/update_weights", {"update_info": info}, **self.wait),
            lambda: wire.send(group, tensors),
        )

    def drop(self, url: str) -> None:
        self.groups.pop(url, None)


class NcclTransport:
    backend = "nccl"

    def __init__(self, timeout_s: float, address: str | None = None, bucket_bytes: int = 1 << 30):
        self.timeout_s = timeout_s
        self.wait = {"timeout": timeout_s}
        self.address = address
        self.bucket_bytes = bucket_bytes
        self.groups: dict = {}

    def connect(self, url: str, call, workers: int) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        address = self.address or local_address_towards(url)
        with socket.socket() as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
        info = {
            "master_address": address, "master_port": port, "world_size": 1 + workers,
            "rank_offset": 1, "packed": True, "packed_buffer_size_bytes": self.bucket_bytes,
            "packed_num_buffers": 2,
        }  # fmt: skip
        self.groups[url] = _while(
            lambda: _init_on_server(url, call, info, self.backend, self.wait),
            lambda: trainer_init(info),
        )

    def pack(self, names: list[str], tensors: list[torch.Tensor]):
        return wire.describe(names, tensors), list(zip(names, tensors, strict=True))

    def send(self, url: str, info: dict, pairs: list, call) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        group = self.groups[url]

        def broadcast():
            packed_nccl_broadcast_producer(
                iterator=iter(pairs), group=group, src=0, post_iter_func=lambda item: item[1],
                buffer_size_bytes=self.bucket_bytes, num_buffers=2,
            )  # fmt: skip
            torch.cuda.current_stream().synchronize()

        _while(lambda: call(url, "/update_weights", {"update_info": info}, **self.wait), broadcast)

    def drop(self, url: str) -> None:
        group = self.groups.pop(url, None)
        if group is not None:
            group.destroy()


TRANSPORTS = {"gloo": GlooTransport, "nccl": NcclTransport}


def transfer_timeout(rollout_timeout: float) -> float:
    return max(rollout_timeout, 30.0)
