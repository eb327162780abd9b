"""The MQTT 5 properties of a result PUBLISH, made and packed without paho's generic per-call work.

paho's Properties builds its name tables per object, checks each attribute by scanning every
property name, and packs by scanning them again: ~30 us and ~190 str.replace calls per result, on
the sender thread that shares the GIL with the whole pipeline. Every result carries the same
properties (ContentType and the user properties event_id, sent_ts), so paho validates them once
here, and ResultProperties packs the very bytes paho's pack gives (tests/edge/test_mqtt_props.py
compares the two).
"""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers, writeUTF

CONTENT_TYPE = "application/json"

# Validated by paho itself: these properties are allowed on a PUBLISH; its tables are shared read-only.
_TEMPLATE = Properties(PacketTypes.PUBLISH)
_TEMPLATE.ContentType = CONTENT_TYPE
_TEMPLATE.UserProperty = [("event_id", ""), ("sent_ts", "")]
_KEYS = frozenset(_TEMPLATE.__dict__)
# paho packs in the order of its name table: Content Type (3) before User Property (38)
_CONTENT = VariableByteIntegers.encode(_TEMPLATE.names["Content Type"]) + writeUTF(CONTENT_TYPE)
_USER = VariableByteIntegers.encode(_TEMPLATE.names["User Property"])


class ResultProperties(Properties):
    """ContentType application/json and the user properties event_id and sent_ts of one result."""

    def __init__(self, event_id: str, sent_ts: str) -> None:
        d = self.__dict__  # no super().__init__ and no __setattr__ checks: the template passed them
        d["packetType"] = PacketTypes.PUBLISH
        d["types"], d["names"], d["properties"] = _TEMPLATE.types, _TEMPLATE.names, _TEMPLATE.properties
        d["ContentType"] = CONTENT_TYPE
        d["UserProperty"] = [("event_id", event_id), ("sent_ts", sent_ts)]

    def pack(self) -> bytes:
        """paho's wire format of these properties; anything else set on the object: paho's own pack."""
        d = self.__dict__
        if d.keys() != _KEYS or d["ContentType"] != CONTENT_TYPE:
            return bytes(super().pack())
        body = _CONTENT + b"".join(_USER + writeUTF(k) + writeUTF(v) for k, v in d["UserProperty"])
        return bytes(VariableByteIntegers.encode(len(body))) + body
