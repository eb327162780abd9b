"""ResultProperties packs the very bytes paho's Properties gives for a result's MQTT 5 properties."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.mqtt_props import CONTENT_TYPE, ResultProperties


def paho_props(event_id: str, sent_ts: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = CONTENT_TYPE
    props.UserProperty = [("event_id", event_id), ("sent_ts", sent_ts)]
    return props


@pytest.mark.parametrize("event_id", ["0f8fad5b-d9cb-469f-a165-70867728950e", "", "é-ünïcödé-✓", "x" * 300])
def test_same_bytes_and_attributes_as_paho(event_id: str) -> None:
    ours, theirs = ResultProperties(event_id, "1733400000.123"), paho_props(event_id, "1733400000.123")
    assert ours.pack() == theirs.pack()
    assert (ours.ContentType, ours.UserProperty) == (theirs.ContentType, theirs.UserProperty)
    assert str(ours) == str(theirs)
    assert isinstance(ours, Properties)


def test_a_property_set_later_is_packed_by_paho() -> None:
    ours, theirs = ResultProperties("e", "1.000"), paho_props("e", "1.000")
    ours.MessageExpiryInterval = theirs.MessageExpiryInterval = 60
    assert ours.pack() == theirs.pack()
