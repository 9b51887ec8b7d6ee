"""Download files of the national filing system as the enterprise interface (企业下载数据格式.xsd)
delivers them, with fictional data: every element the schema requires, GBK-encoded."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape


@dataclass
class Site:
    """One website (Wz_xx) of a subject, with its domains and access records (Jr_xx)."""

    wzid: int
    licence: str
    name: str
    domains: list[str]
    access: list[tuple[int, int, list[tuple[str, str]]]]  # (Jrid, Ispid, [(Qsip, Zzip)])
    modified: str = "2026-11-20 16:00:00"


@dataclass
class Subject:
    ztid: int
    licence: str
    name: str
    dwxz: int = 4  # 企业
    sites: list[Site] = field(default_factory=list)
    modified: str = "2026-11-20 16:00:00"


def v4(text: str) -> str:
    """An IPv4 address as the schema's integer."""
    return str(int(ipaddress.IPv4Address(text)))


def baxx(subject: Subject) -> str:
    sites = "".join(_site(site) for site in subject.sites)
    return (
        "<Baxx><Zt_xx><Ztid>%d</Ztid><Dwmc>%s</Dwmc><Dwxz>%d</Dwxz><Txdz><Shengid>110000</Shengid>"
        "<Xxdz>北京市示例区示例路1号</Xxdz></Txdz><Zj><Zjlx>1</Zjlx><Zjhm>EXAMPLE%08d</Zjhm><Zjzs>示例住所</Zjzs></Zj>"
        "<Fzr><Fzr_xm>示例负责人</Fzr_xm><Fzr_sjhm>13800000000</Fzr_sjhm><Fzr_dzyj>noc@example.cn</Fzr_dzyj></Fzr>"
        "<Baxh>%s</Baxh><Bbyhlx>1</Bbyhlx><Scbbsj>2026-11-01 09:00:00</Scbbsj><Zjxgsj>%s</Zjxgsj></Zt_xx>%s</Baxx>\n"
        % (subject.ztid, escape(subject.name), subject.dwxz, subject.ztid, subject.licence, subject.modified, sites)
    )


def _site(site: Site) -> str:
    domains = "".join("<Ym_xx><Ymid>%d</Ymid><Ym>%s</Ym></Ym_xx>" % (site.wzid * 10 + n, d)
                      for n, d in enumerate(site.domains))  # fmt: skip
    access = ""
    for jrid, ispid, ranges in site.access:
        ips = "".join("<Ip_xx><Ipid>%d</Ipid><Qsip>%s</Qsip><Zzip>%s</Zzip></Ip_xx>" % (jrid * 10 + n, first, last)
                      for n, (first, last) in enumerate(ranges))  # fmt: skip
        access += ("<Jr_xx><Jrid>%d</Jrid><Ispid>%d</Ispid><Wzfb><Fbdd>1</Fbdd></Wzfb><Wzjrfs><Jrfs>1</Jrfs></Wzjrfs>"
                   "%s</Jr_xx>" % (jrid, ispid, ips))  # fmt: skip
    return (
        "\n  <Wz_xx><Wzid>%d</Wzid><Wzmc>%s</Wzmc><Yylb><Yylb_id>1</Yylb_id></Yylb>%s%s"
        "<Wz_Fzr><Fzr_xm>示例</Fzr_xm><Fzr_sjhm>13900000000</Fzr_sjhm></Wz_Fzr><Zjxgsj>%s</Zjxgsj><Baxh>%s</Baxh>"
        "</Wz_xx>\n" % (site.wzid, escape(site.name), domains, access, site.modified, site.licence)
    )


def zxxx(kind: int, record_id: int) -> str:
    return "<Zxxx><Zxlb>%d</Zxlb><Jlid>%d</Jlid></Zxxx>\n" % (kind, record_id)


def document(basj: str = "", zxsj: str = "", lists: str = "") -> str:
    parts = ['<?xml version="1.0" encoding="GBK"?>\n<DownloadData>\n<ICP>\n']
    if basj:
        parts.append("<BASJ>\n%s</BASJ>\n" % basj)
    if zxsj:
        parts.append("<ZXSJ>\n%s</ZXSJ>\n" % zxsj)
    parts.append(lists)
    parts.append("</ICP>\n</DownloadData>\n")
    return "".join(parts)


def write_gbk(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("gbk"))
    return path
