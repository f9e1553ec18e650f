"""How busy each CPU was between two reads of /proc/stat."""

from pathlib import Path

Sample = dict[int, tuple[int, int]]  # cpu number -> (busy, total) jiffies


def read() -> Sample:
    sample = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
            total = user + nice + system + idle + iowait + irq + softirq + steal
            sample[int(name[3:])] = (total - idle - iowait, total)
    return sample


def busy_since(before: Sample) -> dict[int, float]:
    after = read()
    return {cpu: round((after[cpu][0] - before[cpu][0]) / max(1, after[cpu][1] - before[cpu][1]), 3)
            for cpu in after}
