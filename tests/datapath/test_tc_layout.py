"""Every constant of bpf/lib/tc_types.h (and the conntrack lifetimes of bpf/lib/conntrack.h)
has, in agent/nodemesh/datapath/tc.py, the value the compiler gives it: a probe program built
from the headers alone stores each one in a map. The struct mirrors are checked against BCC's
generated types in test_tc_packets.py (test_tc_map_mirrors_match_what_bcc_compiled)."""
import re

import pytest
from test_layout import compiled_constants, header_constant_names

from nodemesh.datapath import loader
from nodemesh.datapath import tc as t

pytestmark = pytest.mark.root

PROBE = """
#include <linux/in.h>
#include "nodemesh.h"
#include "lib/tc_types.h"
BPF_ARRAY(tc_config, struct nm_tc_config, 1); /* what lib/conntrack.h reads */
BPF_HASH(ct, struct nm_ct_key, struct nm_ct_value, 2);
#include "lib/conntrack.h"
"""


def python_constants():
    """Every constant tc.py shares with the headers, under its C name."""
    out = {
        "NM_MAX_CT": t.TcSettings().ct_entries,
        "NM_MAX_NODE_ADDRS": t.TcSettings().node_addrs,
        "NM_SNAT_TRIES": t.SNAT_TRIES,
        "NM_SNAT_REUSE_AFTER_NS": t.SNAT_REUSE_AFTER_NS,
        "NM_CT_REBUILD_BACKENDS": t.CT_REBUILD_BACKENDS,
        "NM_CT_REBUILD_PORTS": t.CT_REBUILD_PORTS,
        "NM_CT_F_SNAT": t.CT_F_SNAT,
        "NM_CT_F_FIN_CLIENT": t.CT_F_FIN_CLIENT,
        "NM_CT_F_FIN_BACKEND": t.CT_F_FIN_BACKEND,
        "NM_CT_F_OVER": t.CT_F_OVER,
        "NM_TC_IFACE_F_CLSACT": t.IFACE_F_CLSACT,
        "NM_TC_IFACE_F_PEER": t.IFACE_F_PEER,
        "NM_TC_INDEX_F_REDIRECTED": t.TC_INDEX_F_REDIRECTED,
        "NM_TC_VERDICT_MAX": len(t.VERDICTS),
        "NM_DROP_MAX": len(t.DROP_REASONS),
        "NM_TC_EV_MAX": len(t.EVENTS),
        # conntrack.h: the lifetimes a zero tc_config field stands for
        "NM_CT_DEFAULT_TCP_SYN_S": t.TcSettings().tcp_syn_seconds,
        "NM_CT_DEFAULT_TCP_ESTABLISHED_S": t.TcSettings().tcp_established_seconds,
        "NM_CT_DEFAULT_TCP_CLOSING_S": t.TcSettings().tcp_closing_seconds,
        "NM_CT_DEFAULT_UDP_S": t.TcSettings().udp_seconds,
    }
    out.update({f"NM_TC_{d.upper()}": i for i, d in t.DIRECTIONS.items()})
    out.update({f"NM_CT_{k.upper()}": i for i, k in t.CT_KINDS.items()})
    out.update({f"NM_CT_{s.upper()}": i for i, s in t.CT_STATES.items()})
    out.update({f"NM_TC_{v.upper()}": i for i, v in t.VERDICTS.items()})
    out.update({f"NM_DROP_{r.upper()}": i for i, r in t.DROP_REASONS.items()})
    out.update({f"NM_TC_EV_{e.upper()}": i for i, e in t.EVENTS.items()})
    return out


# Named differently in the agent than the enum member: the verdict labels are metric values.
RENAMED = {"NM_TC_UNKNOWN_PROTOCOL": "NM_TC_UNKNOWN_PROTO", "NM_DROP_CONNTRACK_FULL":
           "NM_DROP_CT_FULL"}


def header_names():
    src = loader.bpf_source_dir()
    names = header_constant_names((src / "lib" / "tc_types.h").read_text())
    ct_text = (src / "lib" / "conntrack.h").read_text()
    names += [n for n in header_constant_names(ct_text) if n.startswith("NM_CT_DEFAULT_")]
    return [n for n in names if n != "NM_LIB_TC_TYPES_H"]


@pytest.fixture(scope="module")
def compiled_tc_constants():
    with compiled_constants(PROBE, header_names()) as (_bpf, values):
        yield values


def test_every_tc_constant_has_the_value_the_compiler_gives_it(compiled_tc_constants):
    mirrored = {RENAMED.get(k, k): v for k, v in python_constants().items()}
    assert mirrored == compiled_tc_constants


def test_the_conntrack_flags_are_found_in_the_header():
    """The scan the test above relies on sees the flag constants (a #define whose value is an
    expression of others included)."""
    names = header_names()
    assert {"NM_CT_F_SNAT", "NM_CT_F_FIN_CLIENT", "NM_CT_F_FIN_BACKEND", "NM_CT_F_OVER"} <= \
        set(names)
    assert not [n for n in names if not re.match(r"NM_\w+$", n)]
