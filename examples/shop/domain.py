"""The shop's three services' state: event-sourced aggregates, one per service.

Each service owns its aggregates and talks to the others only through
tidings messages (commands and replies, driven by the create-order saga).
"""

from __future__ import annotations

import tidings

# customer service --------------------------------------------------------------


class CustomerRegistered(tidings.Event):
    credit_limit: int


class CreditReserved(tidings.Event):
    order_id: str
    amount: int


class CreditReleased(tidings.Event):
    order_id: str


class Customer(tidings.Aggregate):
    """Credit: never more reserved than the limit; one reservation per order."""

    credit_limit: int = 0
    reservations: dict[str, int] = {}

    @property
    def credit_used(self) -> int:
        return sum(self.reservations.values())

    def apply(self, event: object) -> None:
        match event:
            case CustomerRegistered(credit_limit=limit):
                self.credit_limit = limit
                self.reservations = {}
            # CustomerRegistered gave this aggregate its own dict: change it in place
            case CreditReserved(order_id=o, amount=a):
                self.reservations[o] = a
            case CreditReleased(order_id=o):
                self.reservations.pop(o, None)

    def register(self, credit_limit: int) -> None:
        self.record(CustomerRegistered(credit_limit=credit_limit))

    def reserve(self, order_id: str, amount: int) -> None:
        if order_id in self.reservations:
            return  # already reserved for this order (idempotent in the domain, too)
        if amount <= 0:
            raise ValueError("amount must be positive")
        if self.credit_used + amount > self.credit_limit:
            raise tidings.Rejected(
                f"credit limit exceeded: {self.credit_used} used + {amount} > {self.credit_limit}"
            )
        self.record(CreditReserved(order_id=order_id, amount=amount))

    def release(self, order_id: str) -> None:
        if order_id in self.reservations:
            self.record(CreditReleased(order_id=order_id))


# inventory service -------------------------------------------------------------


class ProductAdded(tidings.Event):
    stock: int
    price: int


class StockReserved(tidings.Event):
    order_id: str
    quantity: int


class StockReleased(tidings.Event):
    order_id: str


class Product(tidings.Aggregate):
    """Stock: never negative; `initial` = stock + everything reserved (sold)."""

    initial: int = 0
    stock: int = 0
    price: int = 0
    reservations: dict[str, int] = {}

    def apply(self, event: object) -> None:
        match event:
            case ProductAdded(stock=s, price=p):
                self.initial, self.stock, self.price = s, s, p
                self.reservations = {}
            case StockReserved(order_id=o, quantity=q):  # own dict since ProductAdded
                self.stock -= q
                self.reservations[o] = q
            case StockReleased(order_id=o):
                self.stock += self.reservations.pop(o, 0)

    def add(self, stock: int, price: int) -> None:
        self.record(ProductAdded(stock=stock, price=price))

    def reserve(self, order_id: str, quantity: int) -> None:
        if order_id in self.reservations:
            return
        if quantity <= 0:
            raise ValueError("quantity must be positive")
        if quantity > self.stock:
            raise tidings.Rejected(f"out of stock: {quantity} wanted, {self.stock} left")
        self.record(StockReserved(order_id=order_id, quantity=quantity))

    def release(self, order_id: str) -> None:
        if order_id in self.reservations:
            self.record(StockReleased(order_id=order_id))


# order service -----------------------------------------------------------------


class OrderCreated(tidings.Event):
    customer_id: str
    product_id: str
    quantity: int
    total: int


class OrderApproved(tidings.Event):
    pass


class OrderRejected(tidings.Event):
    reason: str


class Order(tidings.Aggregate):
    """pending → approved, or pending → rejected (with the reason)."""

    status: str = "new"
    customer_id: str = ""
    product_id: str = ""
    quantity: int = 0
    total: int = 0
    reason: str = ""

    def apply(self, event: object) -> None:
        match event:
            case OrderCreated(customer_id=c, product_id=p, quantity=q, total=t):
                self.status, self.customer_id, self.product_id = "pending", c, p
                self.quantity, self.total = q, t
            case OrderApproved():
                self.status = "approved"
            case OrderRejected(reason=r):
                self.status, self.reason = "rejected", r

    def create(self, customer_id: str, product_id: str, quantity: int, total: int) -> None:
        if self.status != "new":
            return
        self.record(OrderCreated(customer_id=customer_id, product_id=product_id,
                                 quantity=quantity, total=total))

    def approve(self) -> None:
        if self.status == "pending":
            self.record(OrderApproved())

    def reject(self, reason: str) -> None:
        if self.status in ("pending", "new"):
            self.record(OrderRejected(reason=reason))
