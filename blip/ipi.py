"""``blip ipi``: serve BLIP energies and forces to an i-PI server, logging the uncertainty.

i-PI (path-integral MD, replica exchange, ...) runs the dynamics; this client answers its
force requests over the i-PI socket protocol with ASE's
:class:`ase.calculators.socketio.SocketClient` and a :class:`blip.Calculator` attached to
the structure read from START (i-PI sends positions and cell, in that order of atoms; the
client overwrites them before every evaluation, so START only supplies the elements, the
atom order and ``pbc``). One row per force evaluation, i.e. per bead per step, goes to the
sigma log (CSV, written and flushed row by row):

    eval, step, energy_eV, energy_std_eV, max_force_std_eV_A

The client returns when i-PI sends EXIT at the end of its run (or closes the socket).

``energy_eV`` is the energy sent to i-PI, ``energy_std_eV`` its standard deviation,
``max_force_std_eV_A`` the largest per-atom force std, ``max_i sqrt(sum_c std_ic**2)``
(:func:`blip.calculator.max_atom_force_std`). i-PI tells the client neither the step nor
the bead of a request (ASE's client never asks for the bead index). ``eval`` counts the
evaluations from 0; with ``--beads N`` (N = force evaluations per step: the number of
beads, one client, one system) ``step = eval // N``, else the column is empty. Within a
step the beads arrive in i-PI's dispatch order, which is *not* bead 0, 1, ... (with two
beads it alternates 0,1 / 1,0); to attribute a row to a bead, match ``energy_eV`` against
i-PI's ``bead_potentials{electronvolt}`` property of that step.

The forces i-PI integrates are the calculator's prediction: the noise-free (MAP) pass for
BLIP; ``--mode sample`` adds K samples per evaluation for the standard deviations (K+1
passes), ``--mode map`` skips them (sigmas are 0, the plain model's cost).

Stress: ASE's client sends i-PI the virial from the calculator's MAP stress for a periodic
structure (any ``pbc`` true in START), so i-PI's pressure and NPT work; a molecule (``pbc``
all false, as in the acac example) sends a zero virial.
"""

from __future__ import annotations

import csv
import os
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np

from .calculator import BlipCalculator, max_atom_force_std
from .errors import BlipError

LOG_COLUMNS = ("eval", "step", "energy_eV", "energy_std_eV", "max_force_std_eV_A")


class IPIConnectionError(BlipError):
    """No i-PI server reachable at the given address."""


@dataclass
class ServeResult:
    evaluations: int = 0
    max_force_std_seen: float = 0.0  # eV/A, over all evaluations
    max_energy_std_seen: float = 0.0  # eV


def describe_address(unixsocket: str | None, host: str | None, port: int | None) -> str:
    if unixsocket is not None:
        from ase.calculators.socketio import actualunixsocketname

        return f"UNIX socket {actualunixsocketname(unixsocket)} (i-PI <ffsocket mode='unix'><address>{unixsocket}</address>)"
    return f"inet {host}:{port}"


def connect(unixsocket: str | None = None, host: str | None = None, port: int | None = None,
            connect_timeout: float = 60.0, socket_timeout: float | None = None, log=None):
    """An ASE SocketClient connected to i-PI, retrying until ``connect_timeout`` seconds.

    i-PI creates its socket a moment after it starts, so a refused or missing socket is
    retried (every 0.2 s). Raises IPIConnectionError naming the address on timeout.
    """
    from ase.calculators.socketio import SocketClient

    if (unixsocket is None) == (port is None):
        raise BlipError("ipi: give either --unix NAME or --port P (with --host)")
    host = host or "127.0.0.1"
    where = describe_address(unixsocket, host, port)
    deadline = time.monotonic() + max(0.0, float(connect_timeout))
    while True:
        try:
            client = SocketClient(host=host, port=port, unixsocket=unixsocket, timeout=socket_timeout, log=log)
            client.blip_address, client.blip_timeout = where, socket_timeout
            return client
        except (FileNotFoundError, ConnectionRefusedError, socket.timeout, OSError) as exc:
            if time.monotonic() >= deadline:
                raise IPIConnectionError(
                    f"ipi: no i-PI server at {where} after {connect_timeout:g} s "
                    f"({type(exc).__name__}: {exc}); start i-PI first (i-pi input.xml &) "
                    f"and check that the address matches") from None
            time.sleep(0.2)


def write_init_xyz(path, atoms, box: float | None = None) -> None:
    """Write ``atoms`` as an i-PI xyz file (positions and cell in Angstrom).

    The cell is the structure's own for a periodic one, else a cubic ``box`` (default:
    the extent plus 20 A; i-PI needs a cell, the client ignores it while ``pbc`` is false).
    ASE reads the file back as a plain xyz (``pbc`` false), so it also serves as START.
    """
    if np.any(atoms.pbc):
        a, b, c, alpha, beta, gamma = atoms.cell.cellpar()
    else:
        extent = float(np.ptp(atoms.positions, axis=0).max()) if len(atoms) else 0.0
        a = b = c = float(box) if box is not None else extent + 20.0
        alpha = beta = gamma = 90.0
    lines = [str(len(atoms)),
             f"# CELL(abcABC): {a:.8f} {b:.8f} {c:.8f} {alpha:.8f} {beta:.8f} {gamma:.8f} "
             "cell{angstrom} positions{angstrom}"]
    for symbol, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions):
        lines.append(f"{symbol:2s} {x:18.10f} {y:18.10f} {z:18.10f}")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def serve(calc: BlipCalculator, atoms, client, log_path=None, beads: int | None = None,
          progress: bool = False) -> ServeResult:
    """Answer i-PI's requests with ``calc`` on ``atoms`` until i-PI sends EXIT.

    The virial comes from the stress for a periodic ``atoms``. Writes the sigma log
    to ``log_path`` (CSV, flushed per row) if given. Returns counts and the largest sigmas.
    """
    from tqdm.auto import tqdm

    if beads is not None and beads < 1:
        raise BlipError("ipi: --beads must be >= 1")
    use_stress = bool(np.any(atoms.pbc))
    atoms.calc = calc
    result = ServeResult()
    handle = writer = None
    if log_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        handle = open(log_path, "w", newline="")
        writer = csv.writer(handle)
        writer.writerow(LOG_COLUMNS)
        handle.flush()
    bar = tqdm(desc="ipi", unit="eval", disable=not progress, file=sys.stderr)
    try:
        for _ in _requests(client, atoms, use_stress):
            r = calc.results
            e_std = float(r["energy_std"])
            f_std = max_atom_force_std(r["forces_std"])
            n = result.evaluations
            if writer is not None:
                step = "" if beads is None else n // beads
                writer.writerow([n, step, repr(float(r["energy"])), repr(e_std), repr(f_std)])
                handle.flush()
            result.evaluations += 1
            result.max_force_std_seen = max(result.max_force_std_seen, f_std)
            result.max_energy_std_seen = max(result.max_energy_std_seen, e_std)
            bar.update(1)
            bar.set_postfix(E=f"{float(r['energy']):.4f}", max_F_std=f"{f_std:.3g}", refresh=False)
    finally:
        bar.close()
        if handle is not None:
            handle.close()
        client.close()
    return result


def _requests(client, atoms, use_stress):
    """``client.irun`` with a socket timeout turned into a one-line error."""
    try:
        yield from client.irun(atoms, use_stress=use_stress)
    except socket.timeout:
        where = getattr(client, "blip_address", "the socket")
        waited = getattr(client, "blip_timeout", None)
        raise IPIConnectionError(f"ipi: i-PI at {where} sent nothing for {waited} s (--timeout); "
                                 "is it still running?") from None
    except ValueError as exc:  # SocketClient: atoms.positions[:] = i-PI's (natoms, 3)
        if "broadcast" not in str(exc):
            raise
        raise BlipError(f"ipi: i-PI sent positions that do not fit the {len(atoms)} atoms of the start "
                        f"structure ({exc}); give the client the same structure as i-PI's init file") from None


# -- command line ----------------------------------------------------------------------
def cmd_ipi(args) -> int:
    from .data import read_structures

    if args.unix is None and args.port is None:
        raise BlipError("ipi: give --unix NAME or --port P")
    if args.unix is not None and args.port is not None:
        raise BlipError("ipi: give only one of --unix and --port")
    if args.beads is not None and args.beads < 1:
        raise BlipError("ipi: --beads must be >= 1")
    atoms = read_structures(args.structure, index=args.index)[0]
    calc = BlipCalculator(args.model, samples=args.samples, seed=args.seed, device=args.device, mode=args.mode)
    calc.check_atoms(atoms, f"{args.structure}[{args.index}]")
    client = connect(unixsocket=args.unix, host=args.host, port=args.port, connect_timeout=args.connect_timeout,
                     socket_timeout=args.timeout)
    where = describe_address(args.unix, args.host, args.port)
    print(f"blip ipi: connected to {where}; {len(atoms)} atoms, mode {args.mode}, "
          f"K={calc.effective_samples}", file=sys.stderr)
    result = serve(calc, atoms, client, log_path=args.log, beads=args.beads, progress=not args.quiet)
    print(f"blip ipi: i-PI ended the run after {result.evaluations} force evaluation(s); "
          f"max force std seen {result.max_force_std_seen:.4g} eV/A, max energy std "
          f"{result.max_energy_std_seen:.4g} eV" + (f"; sigma log {args.log}" if args.log else ""),
          file=sys.stderr)
    return 0


def register(subparsers) -> None:
    from .cli import nonnegative_int

    p = subparsers.add_parser("ipi", help="serve BLIP forces to an i-PI server (socket client) with a sigma log")
    p.add_argument("model", help="model file (model.pt)")
    p.add_argument("structure", help="structure giving elements, atom order and pbc (same atoms as i-PI's)")
    p.add_argument("--index", default="0", help="which structure of the file (ASE index, default 0)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--unix", metavar="NAME", default=None,
                       help="UNIX socket name: i-PI's <address> with mode='unix' (socket /tmp/ipi_NAME)")
    where.add_argument("--port", type=int, default=None, help="inet port of i-PI's ffsocket (mode='inet')")
    p.add_argument("--host", default="127.0.0.1", help="inet host (with --port)")
    p.add_argument("--samples", type=nonnegative_int, default=None,
                   help="K samples per evaluation (default: the model's uq.samples)")
    p.add_argument("--seed", type=int, default=0,
                   help="model noise seed (the same noise realisation every call: smooth potentials)")
    p.add_argument("--mode", choices=("sample", "map"), default="sample",
                   help="sample: MAP forces plus K samples for the sigmas; map: MAP only (sigmas 0)")
    p.add_argument("--log", default=None, metavar="CSV",
                   help="sigma log, one row per force evaluation (per bead per step)")
    p.add_argument("--beads", type=int, default=None,
                   help="force evaluations per i-PI step (the number of beads), to fill the step column of the log")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds to keep retrying the connection to i-PI (default 60)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for each i-PI message before giving up (default: forever)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ipi)
