"""The typed MT5 API a bot calls: ``rt.mt5`` and every ``mt5-NAME`` terminal's ref.

One async method per ``MetaTrader5`` function the actor serves, with the package's own
signature (positional-only where the package is: keywords raise TypeError there), a
docstring, and ``-> Response``: an editor completes them and a type checker catches a
misspelt function (there is no ``__getattr__`` fallback). Each method only names its
arguments for ``ActorRef.call``, the one path every call takes (the control channel sends
the same names); ``SIGNATURES`` is how the actor turns those names back into the call.

Every method also takes ``timeout_s`` (keyword): the call's deadline, default the actor's
``call_timeout_s``. Dates are ``datetime`` (a naive one is read as the host's local time,
as by the package: pass aware ones), epoch seconds, or ISO 8601 text (UTC without offset).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from supervision.errors import Response
from supervision.ref import ActorRef

# op -> positional parameter names, in the MetaTrader5 order; then keyword-only names.
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "version": ((), ()),
    "terminal_info": ((), ()),
    "account_info": ((), ()),
    "symbols_total": ((), ()),
    "symbols_get": ((), ("group",)),
    "symbol_info": (("symbol",), ()),
    "symbol_select": (("symbol", "enable"), ()),
    "symbol_info_tick": (("symbol",), ()),
    "market_book_add": (("symbol",), ()),
    "market_book_get": (("symbol",), ()),
    "market_book_release": (("symbol",), ()),
    "copy_rates_from": (("symbol", "timeframe", "date_from", "count"), ()),
    "copy_rates_from_pos": (("symbol", "timeframe", "start_pos", "count"), ()),
    "copy_rates_range": (("symbol", "timeframe", "date_from", "date_to"), ()),
    "copy_ticks_from": (("symbol", "date_from", "count", "flags"), ()),
    "copy_ticks_range": (("symbol", "date_from", "date_to", "flags"), ()),
    "order_calc_margin": (("action", "symbol", "volume", "price"), ()),
    "order_calc_profit": (("action", "symbol", "volume", "price_open", "price_close"), ()),
    "order_check": (("request",), ()),
    "order_send": (("request",), ()),
    "positions_total": ((), ()),
    "positions_get": ((), ("symbol", "group", "ticket")),
    "orders_total": ((), ()),
    "orders_get": ((), ("symbol", "group", "ticket")),
    "history_orders_total": (("date_from", "date_to"), ()),
    "history_orders_get": (("date_from", "date_to"), ("group", "ticket", "position")),
    "history_deals_total": (("date_from", "date_to"), ()),
    "history_deals_get": (("date_from", "date_to"), ("group", "ticket", "position")),
}
DATE_PARAMS = {"date_from", "date_to"}

Date = datetime | int | float | str


class Mt5Ref(ActorRef):
    """A terminal actor's handle: the ``MetaTrader5`` functions as async methods.

    Every method returns a ``Response`` (never raises for a terminal failure): ``data`` is
    what the package returns (a record, a tuple of records, a numpy array, a number, True),
    ``error.code`` the service code (``TIMEOUT``, ``ORDER_STATE_UNKNOWN``, ...)."""

    async def _op(self, op: str, args: dict[str, Any], timeout_s: float | None) -> Response:
        return await self.call(op, {k: v for k, v in args.items() if v is not None},
                               timeout_s=timeout_s)

    # ------------------------------------------------------------------ connection
    async def initialize(self, *, timeout_s: float | None = None) -> Response:
        """``initialize()``: ``True`` once the terminal is attached.

        The runtime owns the connection (path, login and server come from the configuration)
        and re-attaches it by itself, so this does not restart anything: like the package's
        ``initialize()`` on a terminal already initialized, it answers True when connected,
        waits (up to the deadline) while the actor reconnects, and answers the actor's error
        (``ACTOR_UNAVAILABLE`` in ERROR) otherwise. ``rt.restart("mt5")`` is the lever that
        starts over."""
        answer = await self._op("terminal_info", {}, timeout_s)
        return Response.success(True) if answer.ok else answer

    async def version(self, *, timeout_s: float | None = None) -> Response:
        """``version()``: ``(terminal version, build, build date)``."""
        return await self._op("version", {}, timeout_s)

    async def terminal_info(self, *, timeout_s: float | None = None) -> Response:
        """``terminal_info()``: the terminal's state and settings (``TerminalInfo``)."""
        return await self._op("terminal_info", {}, timeout_s)

    async def account_info(self, *, timeout_s: float | None = None) -> Response:
        """``account_info()``: the trading account (``AccountInfo``)."""
        return await self._op("account_info", {}, timeout_s)

    # ------------------------------------------------------------------ symbols
    async def symbols_total(self, *, timeout_s: float | None = None) -> Response:
        """``symbols_total()``: how many symbols the terminal knows."""
        return await self._op("symbols_total", {}, timeout_s)

    async def symbols_get(self, *, group: str | None = None,
                          timeout_s: float | None = None) -> Response:
        """``symbols_get(group=...)``: ``SymbolInfo`` of every symbol matching ``group``
        (e.g. ``"*USD*,!EUR*"``), or of all."""
        return await self._op("symbols_get", {"group": group}, timeout_s)

    async def symbol_info(self, symbol: str, /, *,
                          timeout_s: float | None = None) -> Response:
        """``symbol_info(symbol)``: the symbol's contract and quote (``SymbolInfo``)."""
        return await self._op("symbol_info", {"symbol": symbol}, timeout_s)

    async def symbol_info_tick(self, symbol: str, /, *,
                               timeout_s: float | None = None) -> Response:
        """``symbol_info_tick(symbol)``: the symbol's last tick (``Tick``)."""
        return await self._op("symbol_info_tick", {"symbol": symbol}, timeout_s)

    async def symbol_select(self, symbol: str, enable: bool = True, /, *,
                            timeout_s: float | None = None) -> Response:
        """``symbol_select(symbol, enable)``: show (or hide) the symbol in MarketWatch."""
        return await self._op("symbol_select", {"symbol": symbol, "enable": enable},
                              timeout_s)

    async def market_book_add(self, symbol: str, /, *,
                              timeout_s: float | None = None) -> Response:
        """``market_book_add(symbol)``: subscribe to the symbol's Depth of Market."""
        return await self._op("market_book_add", {"symbol": symbol}, timeout_s)

    async def market_book_get(self, symbol: str, /, *,
                              timeout_s: float | None = None) -> Response:
        """``market_book_get(symbol)``: the Depth of Market (a tuple of ``BookInfo``)."""
        return await self._op("market_book_get", {"symbol": symbol}, timeout_s)

    async def market_book_release(self, symbol: str, /, *,
                                  timeout_s: float | None = None) -> Response:
        """``market_book_release(symbol)``: end the Depth of Market subscription."""
        return await self._op("market_book_release", {"symbol": symbol}, timeout_s)

    # ------------------------------------------------------------------ history of prices
    async def copy_rates_from(self, symbol: str, timeframe: int, date_from: Date,
                              count: int, /, *, timeout_s: float | None = None) -> Response:
        """``copy_rates_from(symbol, timeframe, date_from, count)``: ``count`` bars
        ending at ``date_from`` (a numpy structured array)."""
        return await self._op("copy_rates_from", {
            "symbol": symbol, "timeframe": timeframe, "date_from": date_from,
            "count": count}, timeout_s)

    async def copy_rates_from_pos(self, symbol: str, timeframe: int, start_pos: int,
                                  count: int, /, *,
                                  timeout_s: float | None = None) -> Response:
        """``copy_rates_from_pos(symbol, timeframe, start_pos, count)``: ``count`` bars
        from bar ``start_pos`` back (0 = the current bar)."""
        return await self._op("copy_rates_from_pos", {
            "symbol": symbol, "timeframe": timeframe, "start_pos": start_pos,
            "count": count}, timeout_s)

    async def copy_rates_range(self, symbol: str, timeframe: int, date_from: Date,
                               date_to: Date, /, *,
                               timeout_s: float | None = None) -> Response:
        """``copy_rates_range(symbol, timeframe, date_from, date_to)``: the bars in a
        time range."""
        return await self._op("copy_rates_range", {
            "symbol": symbol, "timeframe": timeframe, "date_from": date_from,
            "date_to": date_to}, timeout_s)

    async def copy_ticks_from(self, symbol: str, date_from: Date, count: int, flags: int,
                              /, *, timeout_s: float | None = None) -> Response:
        """``copy_ticks_from(symbol, date_from, count, flags)``: ``count`` ticks from
        ``date_from`` on (``flags``: ``COPY_TICKS_ALL``/``INFO``/``TRADE``)."""
        return await self._op("copy_ticks_from", {
            "symbol": symbol, "date_from": date_from, "count": count, "flags": flags},
            timeout_s)

    async def copy_ticks_range(self, symbol: str, date_from: Date, date_to: Date,
                               flags: int, /, *,
                               timeout_s: float | None = None) -> Response:
        """``copy_ticks_range(symbol, date_from, date_to, flags)``: the ticks in a range."""
        return await self._op("copy_ticks_range", {
            "symbol": symbol, "date_from": date_from, "date_to": date_to, "flags": flags},
            timeout_s)

    # ------------------------------------------------------------------ trading
    async def order_calc_margin(self, action: int, symbol: str, volume: float,
                                price: float, /, *,
                                timeout_s: float | None = None) -> Response:
        """``order_calc_margin(action, symbol, volume, price)``: the margin an order needs,
        in the account currency."""
        return await self._op("order_calc_margin", {
            "action": action, "symbol": symbol, "volume": volume, "price": price},
            timeout_s)

    async def order_calc_profit(self, action: int, symbol: str, volume: float,
                                price_open: float, price_close: float, /, *,
                                timeout_s: float | None = None) -> Response:
        """``order_calc_profit(action, symbol, volume, price_open, price_close)``: the
        profit of a trade, in the account currency."""
        return await self._op("order_calc_profit", {
            "action": action, "symbol": symbol, "volume": volume, "price_open": price_open,
            "price_close": price_close}, timeout_s)

    async def order_check(self, request: dict[str, Any], /, *,
                          timeout_s: float | None = None) -> Response:
        """``order_check(request)``: whether the trade request could be executed
        (``OrderCheckResult``); nothing is sent."""
        return await self._op("order_check", {"request": request}, timeout_s)

    async def order_send(self, request: dict[str, Any], /, *,
                         timeout_s: float | None = None) -> Response:
        """``order_send(request)``: send a trade request (``OrderSendResult``). Never
        retried, never cached; a lost reply is ``ORDER_STATE_UNKNOWN`` and is reconciled
        (by its ``comment`` tag) before the next order on the symbol, never sent twice."""
        return await self._op("order_send", {"request": request}, timeout_s)

    async def positions_total(self, *, timeout_s: float | None = None) -> Response:
        """``positions_total()``: how many positions are open."""
        return await self._op("positions_total", {}, timeout_s)

    async def positions_get(self, *, symbol: str | None = None, group: str | None = None,
                            ticket: int | None = None,
                            timeout_s: float | None = None) -> Response:
        """``positions_get(symbol=, group=, ticket=)``: open positions (``TradePosition``),
        all or those matching one filter."""
        return await self._op("positions_get", {
            "symbol": symbol, "group": group, "ticket": ticket}, timeout_s)

    async def orders_total(self, *, timeout_s: float | None = None) -> Response:
        """``orders_total()``: how many pending orders there are."""
        return await self._op("orders_total", {}, timeout_s)

    async def orders_get(self, *, symbol: str | None = None, group: str | None = None,
                         ticket: int | None = None,
                         timeout_s: float | None = None) -> Response:
        """``orders_get(symbol=, group=, ticket=)``: pending orders (``TradeOrder``)."""
        return await self._op("orders_get", {
            "symbol": symbol, "group": group, "ticket": ticket}, timeout_s)

    # ------------------------------------------------------------------ trade history
    async def history_orders_total(self, date_from: Date, date_to: Date, /, *,
                                   timeout_s: float | None = None) -> Response:
        """``history_orders_total(date_from, date_to)``: orders in the history range."""
        return await self._op("history_orders_total", {
            "date_from": date_from, "date_to": date_to}, timeout_s)

    async def history_orders_get(self, date_from: Date, date_to: Date, /, *,
                                 group: str | None = None, ticket: int | None = None,
                                 position: int | None = None,
                                 timeout_s: float | None = None) -> Response:
        """``history_orders_get(date_from, date_to, group=, ticket=, position=)``: orders
        from the trading history (``TradeOrder``)."""
        return await self._op("history_orders_get", {
            "date_from": date_from, "date_to": date_to, "group": group, "ticket": ticket,
            "position": position}, timeout_s)

    async def history_deals_total(self, date_from: Date, date_to: Date, /, *,
                                  timeout_s: float | None = None) -> Response:
        """``history_deals_total(date_from, date_to)``: deals in the history range."""
        return await self._op("history_deals_total", {
            "date_from": date_from, "date_to": date_to}, timeout_s)

    async def history_deals_get(self, date_from: Date, date_to: Date, /, *,
                                group: str | None = None, ticket: int | None = None,
                                position: int | None = None,
                                timeout_s: float | None = None) -> Response:
        """``history_deals_get(date_from, date_to, group=, ticket=, position=)``: deals
        from the trading history (``TradeDeal``)."""
        return await self._op("history_deals_get", {
            "date_from": date_from, "date_to": date_to, "group": group, "ticket": ticket,
            "position": position}, timeout_s)
