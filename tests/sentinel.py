"""A real Redis Sentinel topology on loopback: one master, replicas, and Sentinels watching
it, each a redis-server child on a free port (broker/redis_process.py), stopped by PID.
Sentinels decide fast here (down-after 1000 ms), so a killed master is replaced in ~2 s."""

from __future__ import annotations

import time

import redis

from broker.redis_process import RedisProcess

MASTER_NAME = "combiner"


class SentinelProcess(RedisProcess):
    """redis-server --sentinel on its own config file (Sentinel rewrites it)."""

    def __init__(self, master_port: int, quorum: int, **kw) -> None:
        super().__init__(**kw)
        self.master_port, self.quorum = master_port, quorum

    def args(self, binary: str) -> list[str]:
        conf = self.dir / "sentinel.conf"
        if not conf.exists():  # a restart keeps what Sentinel learnt
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"logfile {self.log_path}\nsentinel resolve-hostnames no\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 3000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 2\n"
            )
        return [binary, str(conf), "--sentinel"]


class SentinelTopology:
    def __init__(self, replicas: int = 2, sentinels: int = 3) -> None:
        # Any node may become the master: none waits the default 5 s before a full sync.
        fast = {"repl-diskless-sync-delay": "0"}
        self.master = RedisProcess(appendonly=False, options=fast)
        self.replicas = [
            RedisProcess(options={"replicaof": f"127.0.0.1 {self.master.port}", **fast})
            for _ in range(replicas)
        ]
        quorum = sentinels // 2 + 1
        self.sentinels = [SentinelProcess(self.master.port, quorum) for _ in range(sentinels)]

    @property
    def nodes(self) -> list[RedisProcess]:
        return [self.master, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self, timeout: float = 20.0) -> SentinelTopology:
        for node in self.nodes:
            node.start()
        self.wait_synced(timeout)
        for s in self.sentinels:
            s.start()
        self.wait_watched(timeout)
        return self

    def wait_synced(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for replica in self.replicas:
            client = redis.Redis(port=replica.port, socket_timeout=1)
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {replica.port} never synced")
                time.sleep(0.05)
            client.close()

    def wait_watched(self, timeout: float) -> None:
        """Every Sentinel knows the master, its replicas and the other Sentinels."""
        deadline = time.monotonic() + timeout
        for s in self.sentinels:
            client = redis.Redis(port=s.port, socket_timeout=1, decode_responses=True)
            while True:
                try:
                    info = client.sentinel_master(MASTER_NAME)
                    if (
                        int(info["num-slaves"]) == len(self.replicas)
                        and int(info["num-other-sentinels"]) == len(self.sentinels) - 1
                    ):
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sentinel {s.port} never saw the whole topology")
                time.sleep(0.1)
            client.close()

    def master_port(self) -> int:
        """Where the Sentinels say the master is now."""
        client = redis.Redis(port=self.sentinels[0].port, socket_timeout=1)
        try:
            return int(client.sentinel_get_master_addr_by_name(MASTER_NAME)[1])
        finally:
            client.close()

    def node_at(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def close(self) -> None:
        for proc in [*self.sentinels, *self.nodes]:
            proc.close()
