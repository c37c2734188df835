"""One table per Nsight Compute text report of bench/ncu_profile.py: each kernel's time, DRAM bytes, achieved
bandwidth against the H200's measured copy rate (4.2 TB/s, the floors' rate in bench/NOTES.md), registers, warps
active and tensor-pipe share, then the totals and the time those bytes take at the copy rate (the floor of the
kernels as they move data now). Reads a report of this metric set (any CPU; the ncu run needs the GPU):

    ncu --clock-control none --profile-from-start off -k regex:gsa_ --metrics gpu__time_duration.sum,\\
dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread,launch__grid_size,\\
sm__warps_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active \\
        python bench/ncu_profile.py --shape 1,32768,4,512,64 > report.txt
    python bench/ncu_table.py report.txt [more reports]
"""
import re
import sys

COPY_TB_S = 4.2
UNITS = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3,  # to MB
         "ns": 1e-3, "us": 1.0, "ms": 1e3}  # to us
KERNEL = re.compile(r"^  (gsa_\w+) \((\d+), (\d+), (\d+)\)x\((\d+), \d+, \d+\)", re.M)
METRIC = re.compile(r"^\s+([\w.]+)\s+(\S+)?\s+([\d,.]+)\s*$", re.M)


def kernels(text: str):
    """[(name, grid, {metric: value in MB, us or its own unit})] in launch order."""
    heads = list(KERNEL.finditer(text))
    for head, after in zip(heads, heads[1:] + [None]):
        body = text[head.end():after.start() if after else len(text)]
        values = {}
        for name, unit, value in METRIC.findall(body):
            values[name] = float(value.replace(",", "")) * UNITS.get(unit or "", 1.0)
        yield head.group(1), int(head.group(2)) * int(head.group(3)) * int(head.group(4)), values


def table(text: str) -> str:
    lines = [f"{'kernel':<26}{'grid':>6}{'us':>8}{'MB':>8}{'TB/s':>6}{'%copy':>6}{'regs':>5}{'warps%':>7}{'tc%':>5}"]
    total_us = total_mb = 0.0
    for name, grid, m in kernels(text):
        us, mb = m.get("gpu__time_duration.sum", float("nan")), m.get("dram__bytes_read.sum", 0.0) + m.get(
            "dram__bytes_write.sum", 0.0)
        total_us, total_mb = total_us + us, total_mb + mb
        lines.append(f"{name:<26}{grid:>6}{us:8.1f}{mb:8.1f}{mb / us:6.2f}{mb / us / COPY_TB_S * 100:6.0f}"
                     f"{m.get('launch__registers_per_thread', 0):5.0f}"
                     f"{m.get('sm__warps_active.avg.pct_of_peak_sustained_active', 0):7.1f}"
                     f"{m.get('sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active', 0):5.1f}")
    lines.append(f"{'total':<26}{'':>6}{total_us:8.1f}{total_mb:8.1f}{total_mb / total_us:6.2f}"
                 f"{total_mb / total_us / COPY_TB_S * 100:6.0f}   these bytes at {COPY_TB_S} TB/s: "
                 f"{total_mb / COPY_TB_S / 1e3:.3f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"== {path}\n{table(open(path).read())}")
