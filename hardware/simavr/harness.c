/*
 * shopfleet firmware-in-the-loop harness: runs the shelf board firmware under libsimavr with
 * UART0 on a fresh pseudo-terminal and the sensors driven from control lines on stdin.
 *
 * Why a harness: simavr's own command line has no serial input, and its uart_pty part always
 * creates the link /tmp/simavr-uart0, so two boards could not run side by side. This harness
 * opens its own pty, prints its path on stdout ("pty /dev/pts/N"), and the host's driver opens
 * it exactly like /dev/ttyACM0.
 *
 * Emulated parts:
 *   - two HX711s (SCK D2/D4, DOUT D3/D5): on each SCK rising edge the next bit of the value
 *     the test set is put on DOUT (24 bits MSB first; the 25th pulse selects gain 128); DOUT
 *     is low (data ready) between reads, high while a value is "none" (amplifier missing);
 *   - the reed contact (D6): the pin level the test sets (1 = door open);
 *   - a DS18B20 on the 1-wire line (D7, pulled up): presence pulse after a reset, Skip ROM
 *     (0xCC), Convert T (0x44, instant) and Read Scratchpad (0xBE, 9 bytes with CRC8), timed
 *     on the emulated clock from the firmware's own line edges. "temp none" removes it (no
 *     presence pulse: the firmware reports the channel MISSING, which is also the default).
 *
 * Control lines on stdin: "hx CH VALUE", "hx CH none", "door 0|1", "temp DEGC", "temp none",
 * "quit". EOF = quit.
 * With "-e FILE" the EEPROM is loaded from FILE at start (if it exists) and saved on quit, so
 * a test can power-cycle a board and see its calibration survive.
 *
 * Usage: harness [-m atmega328p] [-f 16000000] [-e eeprom.bin] firmware.elf
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

#include <avr_eeprom.h>
#include <avr_ioport.h>
#include <avr_uart.h>
#include <sim_avr.h>
#include <sim_elf.h>
#include <sim_irq.h>
#include <sim_time.h>

#define N_CELLS 2
static const int SCK_BIT[N_CELLS] = {2, 4};
static const int DOUT_BIT[N_CELLS] = {3, 5};
#define REED_BIT 6
#define ONEWIRE_BIT 7
#define EEPROM_SIZE 1024

static avr_t *avr;
static int pty_master = -1;
static int uart_xon = 1;
static avr_irq_t *uart_in;

struct hx711 {
  int32_t value;
  int present;
  int pulses;
  uint32_t latched;
  avr_irq_t *dout;
};
static struct hx711 cells[N_CELLS];

/* Pins the outside world drives (the reed contact). simavr re-applies the internal
 * pull-up to every input pin of a port whenever the firmware writes that port (pinMode,
 * digitalWrite on another pin), which would override the contact; the hook notices and the
 * main loop re-asserts the external level before the next instruction. */
struct driven_pin {
  avr_irq_t *irq;
  uint32_t level;
  int stale;
};
static struct driven_pin reed;

/* DS18B20 slave, advanced from the main loop after every instruction (see ow_step). */
#define DDRD_ADDR 0x2A
#define PORTD_ADDR 0x2B
struct ds18b20 {
  int present;
  int16_t raw;              /* temperature * 16 */
  int mcu_low;              /* the MCU is driving the line low */
  avr_cycle_count_t fall;   /* when it started */
  avr_cycle_count_t low_from, low_until; /* the slave pulls low in [from, until) */
  enum { OW_IDLE, OW_ROM, OW_FUNC, OW_TX } state;
  uint8_t rx, rx_bits;
  uint8_t tx[9];
  int tx_bit;
  avr_irq_t *irq;
  uint32_t level;
};
static struct ds18b20 ow;

static uint8_t crc8(const uint8_t *p, int n) {
  uint8_t crc = 0;
  while (n--) {
    uint8_t in = *p++;
    for (int i = 0; i < 8; i++) {
      uint8_t mix = (crc ^ in) & 1;
      crc >>= 1;
      if (mix) crc ^= 0x8C;
      in >>= 1;
    }
  }
  return crc;
}

static void ow_byte(uint8_t b) {
  if (ow.state == OW_ROM) {
    ow.state = b == 0xCC ? OW_FUNC : OW_IDLE; /* only Skip ROM: one device on the bus */
  } else if (ow.state == OW_FUNC) {
    if (b == 0xBE) {
      uint8_t sp[9] = {(uint8_t)(ow.raw & 0xFF), (uint8_t)(ow.raw >> 8), 0x4B, 0x46, 0x7F, 0xFF, 0x0C, 0x10, 0};
      sp[8] = crc8(sp, 8);
      memcpy(ow.tx, sp, 9);
      ow.tx_bit = 0;
      ow.state = OW_TX;
    } else {
      ow.state = OW_IDLE; /* 0x44 Convert T: the value is ready at once */
    }
  }
}

static void ow_step(void) {
  uint8_t bit = 1 << ONEWIRE_BIT;
  int mcu_low = (avr->data[DDRD_ADDR] & bit) && !(avr->data[PORTD_ADDR] & bit);
  avr_cycle_count_t now = avr->cycle;
  if (mcu_low && !ow.mcu_low) { /* falling edge: a slot or a reset starts */
    ow.fall = now;
    if (ow.present && ow.state == OW_TX && ow.tx_bit < 72) {
      int b = (ow.tx[ow.tx_bit / 8] >> (ow.tx_bit % 8)) & 1;
      ow.tx_bit++;
      if (!b) { ow.low_from = now; ow.low_until = now + avr_usec_to_cycles(avr, 45); }
      if (ow.tx_bit == 72) ow.state = OW_IDLE;
    }
  } else if (!mcu_low && ow.mcu_low && ow.present) { /* released: how long was it low? */
    avr_cycle_count_t d = now - ow.fall;
    if (d >= avr_usec_to_cycles(avr, 400)) { /* reset: answer with a presence pulse */
      ow.low_from = now + avr_usec_to_cycles(avr, 20);
      ow.low_until = now + avr_usec_to_cycles(avr, 160);
      ow.state = OW_ROM;
      ow.rx = ow.rx_bits = 0;
    } else if (ow.state == OW_ROM || ow.state == OW_FUNC) { /* write slot: short low = 1 */
      ow.rx |= (d < avr_usec_to_cycles(avr, 15) ? 1 : 0) << ow.rx_bits;
      if (++ow.rx_bits == 8) {
        ow_byte(ow.rx);
        ow.rx = ow.rx_bits = 0;
      }
    }
  }
  ow.mcu_low = mcu_low;
  uint32_t level = (ow.present && now >= ow.low_from && now < ow.low_until) ? 0 : 1;
  if (!mcu_low && (level != ow.level || ow.irq->value != level)) {
    ow.level = level;
    avr_raise_irq(ow.irq, level);
  }
}

static void driven_hook(avr_irq_t *irq, uint32_t value, void *param) {
  (void)irq;
  struct driven_pin *d = param;
  if (value != d->level) d->stale = 1;
}

static void drive(struct driven_pin *d, uint32_t level) {
  d->level = level;
  d->stale = 0;
  avr_raise_irq(d->irq, level);
}

static void uart_out_hook(avr_irq_t *irq, uint32_t value, void *param) {
  (void)irq;
  (void)param;
  uint8_t b = (uint8_t)value;
  if (pty_master >= 0 && write(pty_master, &b, 1) < 0 && errno != EAGAIN) {
    /* the host closed the port: bytes are lost, as on a real line */
  }
}

static void uart_xon_hook(avr_irq_t *irq, uint32_t value, void *param) {
  (void)irq; (void)value; (void)param;
  uart_xon = 1;
}

static void uart_xoff_hook(avr_irq_t *irq, uint32_t value, void *param) {
  (void)irq; (void)value; (void)param;
  uart_xon = 0;
}

static void sck_hook(avr_irq_t *irq, uint32_t value, void *param) {
  (void)irq;
  struct hx711 *c = param;
  if (!c->present) return;
  if (value) { /* rising edge: shift out the next bit */
    if (c->pulses == 0) c->latched = (uint32_t)c->value & 0xFFFFFF;
    if (c->pulses < 24) avr_raise_irq(c->dout, (c->latched >> (23 - c->pulses)) & 1);
    else avr_raise_irq(c->dout, 1); /* 25th pulse: gain select, conversion starts */
    c->pulses++;
  } else if (c->pulses >= 25) { /* falling edge after the gain pulse: next value ready */
    c->pulses = 0;
    avr_raise_irq(c->dout, 0);
  }
}

static void set_cell(int ch, const char *arg) {
  struct hx711 *c = &cells[ch];
  if (strcmp(arg, "none") == 0) {
    c->present = 0;
    avr_raise_irq(c->dout, 1);
    return;
  }
  c->value = (int32_t)strtol(arg, NULL, 10);
  if (!c->present) {
    c->present = 1;
    c->pulses = 0;
    avr_raise_irq(c->dout, 0);
  }
}

static void eeprom_io(const char *path, int save) {
  uint8_t buf[EEPROM_SIZE];
  avr_eeprom_desc_t d = {.ee = buf, .offset = 0, .size = EEPROM_SIZE - 1}; /* simavr wants offset+size < size */
  if (save) {
    /* simavr 1.6's EEPROM ioctl returns -1 even when it copied the data: do not check it */
    avr_ioctl(avr, AVR_IOCTL_EEPROM_GET, &d);
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); return; }
    fwrite(d.ee, 1, d.size, f);
    fclose(f);
  } else {
    FILE *f = fopen(path, "rb");
    if (!f) return; /* first boot: blank EEPROM */
    size_t n = fread(buf, 1, EEPROM_SIZE - 1, f);
    fclose(f);
    d.size = (uint32_t)n;
    avr_ioctl(avr, AVR_IOCTL_EEPROM_SET, &d);
  }
}

/* Handle complete control lines; return 0 to quit. */
static int control(char *buf, size_t *len) {
  char *nl;
  while ((nl = memchr(buf, '\n', *len)) != NULL) {
    *nl = 0;
    char cmd[16], a[32], b[32];
    int n = sscanf(buf, "%15s %31s %31s", cmd, a, b);
    if (n >= 1 && strcmp(cmd, "quit") == 0) return 0;
    if (n == 3 && strcmp(cmd, "hx") == 0 && atoi(a) >= 0 && atoi(a) < N_CELLS) {
      set_cell(atoi(a), b);
    } else if (n == 2 && strcmp(cmd, "temp") == 0) {
      ow.present = strcmp(a, "none") != 0;
      if (ow.present) ow.raw = (int16_t)(atof(a) * 16.0);
    } else if (n == 2 && strcmp(cmd, "door") == 0) {
      drive(&reed, atoi(a) ? 1 : 0);
    } else if (n >= 1) {
      fprintf(stderr, "harness: unknown control line '%s' (use: hx CH VALUE|none, door 0|1, quit)\n", buf);
    }
    size_t used = (size_t)(nl - buf) + 1;
    memmove(buf, nl + 1, *len - used);
    *len -= used;
  }
  return 1;
}

int main(int argc, char **argv) {
  const char *mmcu = "atmega328p", *eeprom = NULL;
  unsigned long freq = 16000000;
  int opt;
  while ((opt = getopt(argc, argv, "m:f:e:")) != -1) {
    if (opt == 'm') mmcu = optarg;
    else if (opt == 'f') freq = strtoul(optarg, NULL, 10);
    else if (opt == 'e') eeprom = optarg;
    else { fprintf(stderr, "usage: %s [-m mcu] [-f hz] [-e eeprom.bin] firmware.elf\n", argv[0]); return 2; }
  }
  if (optind >= argc) { fprintf(stderr, "usage: %s [-m mcu] [-f hz] [-e eeprom.bin] firmware.elf\n", argv[0]); return 2; }

  elf_firmware_t fw;
  memset(&fw, 0, sizeof(fw));
  if (elf_read_firmware(argv[optind], &fw) != 0) { fprintf(stderr, "harness: cannot read %s\n", argv[optind]); return 1; }
  strncpy(fw.mmcu, mmcu, sizeof(fw.mmcu) - 1);
  fw.frequency = (uint32_t)freq;
  avr = avr_make_mcu_by_name(fw.mmcu);
  if (!avr) { fprintf(stderr, "harness: unknown mcu %s\n", fw.mmcu); return 1; }
  avr_init(avr);
  avr_load_firmware(avr, &fw);
  avr->log = 0;
  if (eeprom) eeprom_io(eeprom, 0);

  int slave;
  char name[256];
  if (openpty(&pty_master, &slave, name, NULL, NULL) != 0) { perror("openpty"); return 1; }
  struct termios t;
  tcgetattr(slave, &t);
  cfmakeraw(&t);
  tcsetattr(slave, TCSANOW, &t);
  fcntl(pty_master, F_SETFL, fcntl(pty_master, F_GETFL) | O_NONBLOCK);
  /* keep the slave open so the master never reads EIO while the host has the port closed */

  uint32_t flags = 0;
  avr_ioctl(avr, AVR_IOCTL_UART_GET_FLAGS('0'), &flags);
  flags &= ~(AVR_UART_FLAG_STDIO | AVR_UART_FLAG_POLL_SLEEP);
  avr_ioctl(avr, AVR_IOCTL_UART_SET_FLAGS('0'), &flags);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUTPUT), uart_out_hook, NULL);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XON), uart_xon_hook, NULL);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XOFF), uart_xoff_hook, NULL);
  uart_in = avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_INPUT);

  for (int i = 0; i < N_CELLS; i++) {
    cells[i].dout = avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('D'), DOUT_BIT[i]);
    avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('D'), SCK_BIT[i]), sck_hook, &cells[i]);
    avr_raise_irq(cells[i].dout, 1); /* missing until the test sets a value */
  }
  reed.irq = avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('D'), REED_BIT);
  ow.irq = avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('D'), ONEWIRE_BIT);
  avr_irq_register_notify(reed.irq, driven_hook, &reed);
  drive(&reed, 0); /* door closed */
  ow.level = 1;
  avr_raise_irq(ow.irq, 1); /* 4.7k pull-up; no DS18B20 until "temp DEGC" */

  printf("pty %s\n", name);
  fflush(stdout);
  fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);

  char ctl[1024];
  size_t ctl_len = 0;
  int running = 1;
  while (running) {
    for (int i = 0; i < 20000; i++) {
      int state = avr_run(avr);
      if (reed.stale) drive(&reed, reed.level);
      ow_step();
      if (state == cpu_Done || state == cpu_Crashed) { fprintf(stderr, "harness: cpu stopped (%d)\n", state); running = 0; break; }
    }
    /* host -> board bytes, one at a time while the UART's input fifo has room */
    while (uart_xon) {
      uint8_t b;
      ssize_t n = read(pty_master, &b, 1);
      if (n != 1) break;
      avr_raise_irq(uart_in, b);
    }
    ssize_t n = read(0, ctl + ctl_len, sizeof(ctl) - 1 - ctl_len);
    if (n == 0) running = 0; /* stdin closed: the test is gone */
    else if (n > 0) {
      ctl_len += (size_t)n;
      if (!control(ctl, &ctl_len)) running = 0;
      if (ctl_len == sizeof(ctl) - 1) ctl_len = 0; /* a runaway line: drop it */
    }
  }
  if (eeprom) eeprom_io(eeprom, 1);
  return 0;
}
