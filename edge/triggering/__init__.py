"""Parts announced by a trigger (MQTT, OPC UA): the durable trigger store and the gate that pairs
each trigger with its frame, so a triggered part gets exactly one result. Not a frame source: the
gate sits between any source and the flow."""
