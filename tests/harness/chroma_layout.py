"""chatd's layout in Chroma, as the tests read it: users spread over shard
collections "chatd-s<N>-<i>" by FNV-1a 64 of the id modulo N, each record
named "<user>/<message id>" and carrying its user in the metadata
(src/chroma.cc). The old layout, one collection "chatd-u-<hex>" per user, is
still produced by tests of `chatd-cleanup migrate`."""

from typing import Optional

from harness.stack import http_json

CHROMA_PREFIX = "/api/v2/tenants/default_tenant/databases/default_database"
DEFAULT_SHARDS = 16  # CHATD_CHROMA_SHARDS default
HTTP_TIMEOUT_S = 30
PAGE = 1000


def shard_of(user: str, shards: int = DEFAULT_SHARDS) -> int:
    h = 0xcbf29ce484222325
    for byte in user.encode():
        h ^= byte
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h % shards


def shard_name(shard: int, shards: int = DEFAULT_SHARDS) -> str:
    return f"chatd-s{shards}-{shard}"


def legacy_collection_name(user: str) -> str:
    return "chatd-u-" + user.encode().hex()


def collection_id(chroma_url: str, name: str) -> Optional[str]:
    status, body = http_json(f"{chroma_url}{CHROMA_PREFIX}/collections/{name}", timeout=HTTP_TIMEOUT_S)
    if status == 404:
        return None
    assert status == 200, (status, body)
    return body["id"]


def _get_all(chroma_url: str, collection: str, where: Optional[dict]) -> "list[dict]":
    out = []
    offset = 0
    while True:
        payload = {"include": ["documents", "metadatas", "embeddings"], "limit": PAGE, "offset": offset}
        if where is not None:
            payload["where"] = where
        status, got = http_json(f"{chroma_url}{CHROMA_PREFIX}/collections/{collection}/get", "POST", payload,
                                timeout=HTTP_TIMEOUT_S)
        if status == 404:
            return out
        if status == 500 and "Nothing found on disk" in str(got) and offset == 0:
            return out  # Chroma 1.5.9 cannot read a collection nothing was written to yet
        assert status == 200, (status, got)
        for i, d, m, e in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"]):
            # chatd writes a message's text into the metadata ("text"); records
            # written before carry it as the document. Either way it is the
            # record's document here. chatd leaves role and turn out of the
            # metadata when the message id says them ("<turn>:u" / ":a") and
            # reads them from the id; they are put back here the same way, so
            # "metadata" is what chatd reads and "stored_keys" what Chroma holds.
            m = dict(m or {})
            stored_keys = sorted(m)
            text = m.pop("text", None)
            message_id = i.split("/", 1)[-1]
            turn, _, half = message_id.rpartition(":")
            if turn and half in ("u", "a"):
                m.setdefault("role", "user" if half == "u" else "assistant")
                m.setdefault("turn", turn)
            out.append({"raw_id": i, "id": message_id, "document": text if text is not None else d,
                        "metadata": m, "stored_keys": stored_keys, "embedding": e})
        if len(got["ids"]) < PAGE:
            return out
        offset += PAGE


def user_records(chroma_url: str, user: str, shards: int = DEFAULT_SHARDS) -> "list[dict]":
    """Every record of the user in its shard, as {id (without the user
    prefix), raw_id, document, metadata, embedding}; asserts that each one
    really is the user's."""
    collection = collection_id(chroma_url, shard_name(shard_of(user, shards), shards))
    if collection is None:
        return []
    records = _get_all(chroma_url, collection, {"user": user})
    for r in records:
        assert r["metadata"]["user"] == user and r["raw_id"].startswith(user + "/"), r["raw_id"]
    return records


def shard_records(chroma_url: str, shard: int, shards: int = DEFAULT_SHARDS) -> "list[dict]":
    """Every record of one shard, all users."""
    collection = collection_id(chroma_url, shard_name(shard, shards))
    return [] if collection is None else _get_all(chroma_url, collection, None)


def legacy_records(chroma_url: str, user: str) -> "list[dict]":
    collection = collection_id(chroma_url, legacy_collection_name(user))
    return [] if collection is None else _get_all(chroma_url, collection, None)
