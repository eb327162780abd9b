"""The station's nodes: string node ids in the station's own namespace (docs/opcua.md lists them).

Modelled on OPC 40100 (Machine Vision), simplified: a station object with its state, a StartJob
and an Acknowledge method, and a Result object the station fills. Every variable is read-only
for clients; the PLC acts only through the two methods. Values are written by `publish`, always
the Result fields before the counters, so a PLC that reacts to ResultCounter reads a whole result.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from asyncua import Node, Server, ua

from edge.opcua.handshake import PlcResult, View

MethodHandler = Callable[..., Awaitable[list[ua.Variant]]]

# (browse name, variant type, initial value) of the Result object's variables, in write order.
RESULT_VARS: tuple[tuple[str, ua.VariantType, Any], ...] = (
    ("PartId", ua.VariantType.String, ""),
    ("Verdict", ua.VariantType.String, ""),  # pass | fail | error
    ("DefectCount", ua.VariantType.UInt32, 0),
    ("TotalDefectArea", ua.VariantType.UInt32, 0),  # pixels
    ("EventId", ua.VariantType.String, ""),  # the MQTT result event's event_id
    ("ModelVersion", ua.VariantType.String, ""),
    ("Recipe", ua.VariantType.String, ""),  # "" = the station's own rules
    ("ErrorText", ua.VariantType.String, ""),  # why an `error` verdict; "" otherwise
    ("TriggerTime", ua.VariantType.DateTime, None),
    ("CaptureTime", ua.VariantType.DateTime, None),
    ("ResultTime", ua.VariantType.DateTime, None),
    ("InferenceMs", ua.VariantType.Double, 0.0),
    ("StationMs", ua.VariantType.Double, 0.0),  # capture -> result inside the station
    ("PlcJob", ua.VariantType.Boolean, False),  # started by StartJob (False: MQTT trigger, restart recovery)
    ("Counter", ua.VariantType.UInt32, 0),
)
STATION_VARS: tuple[tuple[str, ua.VariantType, Any], ...] = (
    ("State", ua.VariantType.Int32, 0),  # 0 Initialized, 1 Ready, 2 Busy, 3 Error
    ("StateText", ua.VariantType.String, ""),
    ("JobsRunning", ua.VariantType.UInt32, 0),
    ("ResultsPending", ua.VariantType.UInt32, 0),
    ("ResultCounter", ua.VariantType.UInt32, 0),
)
_EPOCH = dt.datetime(1601, 1, 1, tzinfo=dt.timezone.utc)  # OPC UA's DateTime zero


@dataclass
class StationNodes:
    """The variables by node id suffix, and the last value written (only changes are written)."""

    variables: dict[str, tuple[Node, ua.VariantType]]
    written: dict[str, Any]

    async def write(self, name: str, value: Any) -> None:
        if self.written.get(name, object()) == value:
            return
        node, vtype = self.variables[name]
        await node.write_value(ua.DataValue(ua.Variant(value, vtype)))
        self.written[name] = value

    async def publish(self, view: View) -> None:
        r = view.result
        if r is not None:
            for name, value in zip((n for n, _, _ in RESULT_VARS), _result_values(r), strict=True):
                await self.write(f"Station.Result.{name}", value)
        await self.write("Station.ResultCounter", view.counter)
        await self.write("Station.JobsRunning", view.jobs)
        await self.write("Station.ResultsPending", view.unacked)
        await self.write("Station.StateText", view.state_text[:1000])
        await self.write("Station.State", int(view.state))


def _time(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc) if ts > 0 else _EPOCH


def _result_values(r: PlcResult) -> tuple[Any, ...]:
    return (r.part_id, r.verdict, r.defect_count, r.total_defect_area, r.event_id, r.model_version, r.recipe,
            r.error[:1000], _time(r.trigger_ts), _time(r.capture_ts), _time(r.result_ts), r.inference_ms,
            r.station_ms, r.plc_job, r.counter)


def _arg(name: str, vtype: ua.VariantType, text: str) -> ua.Argument:
    arg = ua.Argument()
    arg.Name, arg.DataType, arg.ValueRank = name, ua.NodeId(ua.Int32(vtype.value)), -1
    arg.Description = ua.LocalizedText(text)
    return arg


async def build(server: Server, ns: int, station_name: str, recipes: list[str],
                start_job: MethodHandler, acknowledge: MethodHandler) -> StationNodes:
    """Create the station object under Objects; returns its variables for publishing."""
    def nid(name: str) -> ua.NodeId:
        return ua.NodeId(ua.String(name), ua.Int16(ns))

    station = await server.nodes.objects.add_object(nid("Station"), ua.QualifiedName("Station", ns))
    await station.write_attribute(ua.AttributeIds.Description,
                                  ua.DataValue(ua.Variant(ua.LocalizedText(f"inspection station {station_name}"))))
    variables: dict[str, tuple[Node, ua.VariantType]] = {}
    for name, vtype, init in STATION_VARS:
        key = f"Station.{name}"
        node = await station.add_variable(nid(key), ua.QualifiedName(name, ns), _initial(init, vtype), vtype)
        variables[key] = (node, vtype)
    result = await station.add_object(nid("Station.Result"), ua.QualifiedName("Result", ns))
    for name, vtype, init in RESULT_VARS:
        key = f"Station.Result.{name}"
        node = await result.add_variable(nid(key), ua.QualifiedName(name, ns), _initial(init, vtype), vtype)
        variables[key] = (node, vtype)
    await station.add_variable(nid("Station.Recipes"), ua.QualifiedName("Recipes", ns),
                               ua.Variant(sorted(recipes), ua.VariantType.String, is_array=True))
    status_out = [_arg("Status", ua.VariantType.Int32, "0 = ok; see docs/opcua.md for the others"),
                  _arg("StatusText", ua.VariantType.String, "readable status")]
    await station.add_method(nid("Station.StartJob"), ua.QualifiedName("StartJob", ns), start_job,
                             [_arg("PartId", ua.VariantType.String, "the part's id (1-128 printable, no slashes)"),
                              _arg("Recipe", ua.VariantType.String, "recipe name, or empty for the station rules")],
                             status_out)
    await station.add_method(nid("Station.Acknowledge"), ua.QualifiedName("Acknowledge", ns), acknowledge,
                             [_arg("ResultCounter", ua.VariantType.UInt32, "the counter of the result read")],
                             status_out)
    return StationNodes(variables, {})


def _initial(value: Any, vtype: ua.VariantType) -> ua.Variant:
    return ua.Variant(_EPOCH if vtype == ua.VariantType.DateTime and value is None else value, vtype)
