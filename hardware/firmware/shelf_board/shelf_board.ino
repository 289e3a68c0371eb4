// shopfleet shelf board firmware (Arduino Uno/Nano, ATmega328P, 16 MHz).
//
// Reads two HX711 load-cell amplifiers, a reed door contact and a DS18B20 fridge thermometer
// and speaks the framed serial protocol of docs/serial-protocol.md at 115200 baud:
// COBS-framed payloads (0x00 delimiter) with a CRC-16/CCITT-FALSE, a sequence number per
// frame, HELLO at boot, READINGS every interval, ACKs for PING/TARE/CALIBRATE/SET_RATE/
// HELLO_REQUEST. Tare offsets and scales live in EEPROM (with a magic, a layout version and a
// CRC, so a blank or corrupt EEPROM falls back to defaults instead of nonsense).
//
// Build with Debian's arduino-mk (see Makefile). SIMULATION=1 is a compile-time switch of this
// same sketch: it replaces the sensor reads (HX711 bits, reed pin, 1-wire) with values the
// host sets with SIM_SET frames, so the firmware runs without sensors. Production builds
// (SIMULATION=0, the default) answer SIM_SET with UNKNOWN_COMMAND. The emulator tests run
// the production build with the HX711 and reed pins driven by hardware/simavr/harness.c.
//
// Pins: HX711 #0 SCK D2, DOUT D3; HX711 #1 SCK D4, DOUT D5; reed D6 (to GND, internal
// pull-up: HIGH = door open); DS18B20 data D7 (4.7k pull-up).

#include <EEPROM.h>

#ifndef SIMULATION
#define SIMULATION 0
#endif
#ifndef BOARD_ID
#define BOARD_ID "shelf-board"
#endif

#define FW_MAJOR 1
#define FW_MINOR 0
#define PROTOCOL_VERSION 1

// Frame types (docs/serial-protocol.md)
#define T_HELLO 0x01
#define T_READINGS 0x02
#define T_ACK 0x03
#define T_PING 0x10
#define T_TARE 0x11
#define T_CALIBRATE 0x12
#define T_SET_RATE 0x13
#define T_HELLO_REQUEST 0x14
#define T_SIM_SET 0x20

#define ACK_OK 0
#define ACK_BAD_ARGUMENT 1
#define ACK_UNKNOWN_COMMAND 2
#define ACK_SENSOR_ERROR 3

#define ST_OK 0
#define ST_MISSING 1
#define ST_SATURATED 2

#define KIND_LOAD_CELL 1
#define KIND_DOOR 2
#define KIND_TEMPERATURE 3
#define UNIT_DECIGRAM 1
#define UNIT_STATE 2
#define UNIT_CENTI_CELSIUS 3

#define N_CELLS 2
#define N_CHANNELS 4
#define CH_DOOR 2
#define CH_TEMP 3

static const uint8_t SCK_PIN[N_CELLS] = {2, 4};
static const uint8_t DOUT_PIN[N_CELLS] = {3, 5};
static const uint8_t REED_PIN = 6;
static const uint8_t ONEWIRE_PIN = 7;

// --- EEPROM calibration --------------------------------------------------------------------
#define EE_MAGIC 0x5346  // "SF"
#define EE_LAYOUT 1
struct Calibration {
  uint16_t magic;
  uint8_t layout;
  int32_t offset[N_CELLS];
  float scale[N_CELLS];  // raw counts per gram
  uint16_t crc;
};
static Calibration cal;

static uint16_t crc16(const uint8_t *data, uint16_t len, uint16_t crc = 0xFFFF) {
  // CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor.
  while (len--) {
    crc ^= (uint16_t)(*data++) << 8;
    for (uint8_t i = 0; i < 8; i++) crc = (crc & 0x8000) ? (crc << 1) ^ 0x1021 : crc << 1;
  }
  return crc;
}

static void calibrationDefaults() {
  cal.magic = EE_MAGIC;
  cal.layout = EE_LAYOUT;
  for (uint8_t i = 0; i < N_CELLS; i++) {
    cal.offset[i] = 0;
    cal.scale[i] = 420.0f;  // nominal 5 kg cell at gain 128; CALIBRATE replaces it
  }
}

static void calibrationLoad() {
  EEPROM.get(0, cal);
  uint16_t want = crc16((const uint8_t *)&cal, sizeof(cal) - sizeof(cal.crc));
  if (cal.magic != EE_MAGIC || cal.layout != EE_LAYOUT || cal.crc != want) calibrationDefaults();
}

static void calibrationSave() {
  cal.crc = crc16((const uint8_t *)&cal, sizeof(cal) - sizeof(cal.crc));
  EEPROM.put(0, cal);
}

// --- framing -------------------------------------------------------------------------------
static uint16_t txSeq = 0;
static uint8_t txBuf[64];

static void sendFrame(uint8_t type, const uint8_t *body, uint8_t len) {
  uint8_t payload[60];
  payload[0] = PROTOCOL_VERSION;
  payload[1] = type;
  payload[2] = txSeq & 0xFF;
  payload[3] = txSeq >> 8;
  txSeq++;
  memcpy(payload + 4, body, len);
  uint8_t n = len + 4;
  uint16_t crc = crc16(payload, n);
  payload[n++] = crc >> 8;
  payload[n++] = crc & 0xFF;
  // COBS encode (n < 254, so a single block suffices)
  uint8_t out = 1, code = 1, codeAt = 0;
  for (uint8_t i = 0; i < n; i++) {
    if (payload[i] == 0) {
      txBuf[codeAt] = code;
      codeAt = out++;
      code = 1;
    } else {
      txBuf[out++] = payload[i];
      code++;
    }
  }
  txBuf[codeAt] = code;
  txBuf[out++] = 0;
  Serial.write(txBuf, out);
}

static void put32(uint8_t *p, int32_t v) {
  p[0] = v & 0xFF;
  p[1] = (v >> 8) & 0xFF;
  p[2] = (v >> 16) & 0xFF;
  p[3] = (v >> 24) & 0xFF;
}

static void sendHello() {
  static const char id[] = BOARD_ID;
  uint8_t body[48];
  uint8_t n = 0;
  body[n++] = FW_MAJOR;
  body[n++] = FW_MINOR;
  body[n++] = sizeof(id) - 1;
  memcpy(body + n, id, sizeof(id) - 1);
  n += sizeof(id) - 1;
  body[n++] = N_CHANNELS;
  for (uint8_t i = 0; i < N_CELLS; i++) {
    body[n++] = KIND_LOAD_CELL;
    body[n++] = UNIT_DECIGRAM;
  }
  body[n++] = KIND_DOOR;
  body[n++] = UNIT_STATE;
  body[n++] = KIND_TEMPERATURE;
  body[n++] = UNIT_CENTI_CELSIUS;
  sendFrame(T_HELLO, body, n);
}

static void sendAck(uint16_t cmdSeq, uint8_t status, int32_t value) {
  uint8_t body[7];
  body[0] = cmdSeq & 0xFF;
  body[1] = cmdSeq >> 8;
  body[2] = status;
  put32(body + 3, value);
  sendFrame(T_ACK, body, 7);
}

// --- sensors -------------------------------------------------------------------------------
static int32_t rawValue[N_CELLS];
static uint8_t rawStatus[N_CELLS] = {ST_MISSING, ST_MISSING};
static unsigned long rawAt[N_CELLS];
static uint8_t doorOpen = 0;
static int32_t tempCenti = 0;
static uint8_t tempStatus = ST_MISSING;

#if SIMULATION
static bool hx711Ready(uint8_t) { return true; }
static int32_t hx711Read(uint8_t ch) { return rawValue[ch]; }
static void readDoor() {}
static void readTemperature() {}
#else
static bool hx711Ready(uint8_t ch) { return digitalRead(DOUT_PIN[ch]) == LOW; }

static int32_t hx711Read(uint8_t ch) {
  // 24 bits MSB first, then one more pulse selects channel A, gain 128 for the next conversion.
  uint32_t v = 0;
  for (uint8_t i = 0; i < 24; i++) {
    digitalWrite(SCK_PIN[ch], HIGH);
    delayMicroseconds(1);
    v = (v << 1) | (digitalRead(DOUT_PIN[ch]) == HIGH ? 1 : 0);
    digitalWrite(SCK_PIN[ch], LOW);
    delayMicroseconds(1);
  }
  digitalWrite(SCK_PIN[ch], HIGH);
  delayMicroseconds(1);
  digitalWrite(SCK_PIN[ch], LOW);
  if (v & 0x800000UL) v |= 0xFF000000UL;  // sign-extend
  return (int32_t)v;
}

static void readDoor() { doorOpen = digitalRead(REED_PIN) == HIGH ? 1 : 0; }

// Minimal 1-wire for one DS18B20 on the bus (skip ROM), non-blocking conversion.
static bool owReset() {
  pinMode(ONEWIRE_PIN, OUTPUT);
  digitalWrite(ONEWIRE_PIN, LOW);
  delayMicroseconds(480);
  noInterrupts();
  pinMode(ONEWIRE_PIN, INPUT);
  delayMicroseconds(70);
  bool present = digitalRead(ONEWIRE_PIN) == LOW;
  interrupts();
  delayMicroseconds(410);
  return present;
}

static void owWriteBit(uint8_t b) {
  noInterrupts();
  pinMode(ONEWIRE_PIN, OUTPUT);
  digitalWrite(ONEWIRE_PIN, LOW);
  delayMicroseconds(b ? 6 : 60);
  pinMode(ONEWIRE_PIN, INPUT);
  interrupts();
  delayMicroseconds(b ? 64 : 10);
}

static uint8_t owReadBit() {
  noInterrupts();
  pinMode(ONEWIRE_PIN, OUTPUT);
  digitalWrite(ONEWIRE_PIN, LOW);
  delayMicroseconds(3);
  pinMode(ONEWIRE_PIN, INPUT);
  delayMicroseconds(10);
  uint8_t b = digitalRead(ONEWIRE_PIN) == HIGH;
  interrupts();
  delayMicroseconds(53);
  return b;
}

static void owWrite(uint8_t v) {
  for (uint8_t i = 0; i < 8; i++) owWriteBit((v >> i) & 1);
}

static uint8_t owRead() {
  uint8_t v = 0;
  for (uint8_t i = 0; i < 8; i++) v |= owReadBit() << i;
  return v;
}

static uint8_t crc8(const uint8_t *p, uint8_t n) {
  uint8_t crc = 0;
  while (n--) {
    uint8_t in = *p++;
    for (uint8_t i = 0; i < 8; i++) {
      uint8_t mix = (crc ^ in) & 1;
      crc >>= 1;
      if (mix) crc ^= 0x8C;
      in >>= 1;
    }
  }
  return crc;
}

static unsigned long convStarted = 0;
static bool converting = false;

static void readTemperature() {
  unsigned long now = millis();
  if (!converting) {
    if (now - convStarted < 1000) return;
    if (!owReset()) {
      tempStatus = ST_MISSING;
      convStarted = now;
      return;
    }
    owWrite(0xCC);  // skip ROM
    owWrite(0x44);  // convert T
    converting = true;
    convStarted = now;
    return;
  }
  if (now - convStarted < 750) return;
  converting = false;
  if (!owReset()) {
    tempStatus = ST_MISSING;
    return;
  }
  owWrite(0xCC);
  owWrite(0xBE);  // read scratchpad
  uint8_t sp[9];
  for (uint8_t i = 0; i < 9; i++) sp[i] = owRead();
  // Byte 4 (configuration) always has its low 5 bits set: rejects a bus stuck low.
  if (crc8(sp, 8) != sp[8] || (sp[4] & 0x1F) != 0x1F) {
    tempStatus = ST_MISSING;
    return;
  }
  int16_t raw = (int16_t)((sp[1] << 8) | sp[0]);
  tempCenti = ((int32_t)raw * 100) / 16;
  tempStatus = ST_OK;
}
#endif

static void sampleCells() {
  unsigned long now = millis();
  for (uint8_t ch = 0; ch < N_CELLS; ch++) {
    if (hx711Ready(ch)) {
      rawValue[ch] = hx711Read(ch);
      rawAt[ch] = now;
      rawStatus[ch] = (rawValue[ch] == 0x7FFFFFL || rawValue[ch] == -0x800000L) ? ST_SATURATED : ST_OK;
    } else if (now - rawAt[ch] > 1000) {
      rawStatus[ch] = ST_MISSING;  // no conversion for a second: unplugged or dead amplifier
    }
  }
}

// Average n fresh conversions of a cell; false if the HX711 does not answer in time.
static bool averageRaw(uint8_t ch, int32_t *out) {
  int64_t sum = 0;
  for (uint8_t i = 0; i < 8; i++) {
    unsigned long start = millis();
    while (!hx711Ready(ch)) {
      if (millis() - start > 500) return false;
    }
    sum += hx711Read(ch);
  }
  *out = (int32_t)(sum / 8);
  return true;
}

// --- commands ------------------------------------------------------------------------------
static uint16_t intervalMs = 100;
static uint8_t rxBuf[64];
static uint8_t rxLen = 0;
static bool rxOverflow = false;

static int32_t get32(const uint8_t *p) {
  return (int32_t)((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24));
}

static void handleFrame(uint8_t *enc, uint8_t len) {
  // COBS decode in place; drop anything invalid (the host counts missing ACKs).
  uint8_t out = 0, i = 0;
  while (i < len) {
    uint8_t code = enc[i];
    if (code == 0 || i + code > len) return;
    for (uint8_t j = 1; j < code; j++) enc[out++] = enc[i + j];
    i += code;
    if (code != 0xFF && i < len) enc[out++] = 0;
  }
  if (out < 6) return;
  uint16_t crc = ((uint16_t)enc[out - 2] << 8) | enc[out - 1];
  if (crc16(enc, out - 2) != crc) return;
  if (enc[0] == 0 || enc[0] > PROTOCOL_VERSION) return;
  uint8_t type = enc[1];
  uint16_t seq = enc[2] | ((uint16_t)enc[3] << 8);
  const uint8_t *body = enc + 4;
  uint8_t blen = out - 6;
  switch (type) {
    case T_PING:
      sendAck(seq, ACK_OK, 0);
      return;
    case T_HELLO_REQUEST:
      sendHello();
      sendAck(seq, ACK_OK, 0);
      return;
    case T_SET_RATE: {
      if (blen < 2) break;
      uint16_t ms = body[0] | ((uint16_t)body[1] << 8);
      if (ms < 10 || ms > 60000) {
        sendAck(seq, ACK_BAD_ARGUMENT, ms);
        return;
      }
      intervalMs = ms;
      sendAck(seq, ACK_OK, ms);
      return;
    }
    case T_TARE:
    case T_CALIBRATE: {
      if (blen < 5) break;
      uint8_t ch = body[0];
      int32_t arg = get32(body + 1);
      if (ch >= N_CELLS) {
        sendAck(seq, ACK_BAD_ARGUMENT, ch);
        return;
      }
      int32_t avg;
      if (!averageRaw(ch, &avg)) {
        sendAck(seq, ACK_SENSOR_ERROR, 0);
        return;
      }
      if (type == T_TARE) {
        cal.offset[ch] = avg;
        calibrationSave();
        sendAck(seq, ACK_OK, avg);
        return;
      }
      int32_t diff = avg - cal.offset[ch];
      if (arg <= 0 || diff < 100) {  // no mass on the cell, or a nonsense mass
        sendAck(seq, ACK_BAD_ARGUMENT, diff);
        return;
      }
      cal.scale[ch] = (float)diff / ((float)arg / 10.0f);
      calibrationSave();
      sendAck(seq, ACK_OK, (int32_t)cal.scale[ch]);
      return;
    }
#if SIMULATION
    case T_SIM_SET: {
      if (blen < 5) break;
      uint8_t ch = body[0];
      int32_t v = get32(body + 1);
      if (ch < N_CELLS) {
        rawValue[ch] = v;
      } else if (ch == CH_DOOR) {
        doorOpen = v ? 1 : 0;
      } else if (ch == CH_TEMP) {
        tempCenti = v;
        tempStatus = ST_OK;
      } else {
        sendAck(seq, ACK_BAD_ARGUMENT, ch);
        return;
      }
      sendAck(seq, ACK_OK, v);
      return;
    }
#endif
    default:
      sendAck(seq, ACK_UNKNOWN_COMMAND, type);
      return;
  }
  sendAck(seq, ACK_BAD_ARGUMENT, blen);  // body too short
}

static void pollSerial() {
  while (Serial.available() > 0) {
    uint8_t b = Serial.read();
    if (b == 0) {
      if (!rxOverflow && rxLen > 0) handleFrame(rxBuf, rxLen);
      rxLen = 0;
      rxOverflow = false;
    } else if (rxLen < sizeof(rxBuf)) {
      rxBuf[rxLen++] = b;
    } else {
      rxOverflow = true;  // too long for any command: drop until the next delimiter
    }
  }
}

static void sendReadings() {
  uint8_t body[5 + 5 * N_CHANNELS];
  put32(body, (int32_t)millis());
  body[4] = N_CHANNELS;
  uint8_t *p = body + 5;
  for (uint8_t ch = 0; ch < N_CELLS; ch++) {
    int32_t dg = (int32_t)((float)(rawValue[ch] - cal.offset[ch]) * 10.0f / cal.scale[ch]);
    put32(p, dg);
    p[4] = rawStatus[ch];
    p += 5;
  }
  put32(p, doorOpen);
  p[4] = ST_OK;
  p += 5;
  put32(p, tempCenti);
  p[4] = tempStatus;
  sendFrame(T_READINGS, body, sizeof(body));
}

void setup() {
  Serial.begin(115200);
#if !SIMULATION
  for (uint8_t ch = 0; ch < N_CELLS; ch++) {
    pinMode(SCK_PIN[ch], OUTPUT);
    digitalWrite(SCK_PIN[ch], LOW);
    pinMode(DOUT_PIN[ch], INPUT);
  }
  pinMode(REED_PIN, INPUT_PULLUP);
  pinMode(ONEWIRE_PIN, INPUT);
#endif
  calibrationLoad();
  sendHello();
}

void loop() {
  static unsigned long last = 0;
  pollSerial();
  readTemperature();
  unsigned long now = millis();
  if (now - last >= intervalMs) {
    last = now;
    sampleCells();
    readDoor();
    sendReadings();
  }
}
